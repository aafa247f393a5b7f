//! The intake journal: how the SQLite store acknowledges a postback without a
//! round trip through SQLite.
//!
//! Why: the profile (docs/performance.md) showed the answer time dominated by
//! the commit hand-off: waking the writer thread, a SQLite transaction writing
//! several 4 KiB WAL pages per postback, and waking the request again. The
//! durable minimum is one small append and, with `sync: full`, one fdatasync.
//!
//! How:
//! - [`Intake::append`] runs on the request's own task: a dedupe check (keys
//!   journaled but not yet moved, then SQLite's dedupe table), then one framed
//!   record (length, CRC-32, the postback) written after the last one in the
//!   current segment. Segments are written full of zeros beforehand (by the
//!   writer thread, [`Intake::prepare_spare`]): a record then overwrites
//!   allocated blocks, and its fdatasync flushes data only. An append would
//!   change the file's size, and the filesystem's journal commit for that
//!   makes the fdatasync wait for other files' pending writes (SQLite's).
//! - [`Intake::sync_through`] (`sync: full`) is group commit without a thread
//!   of its own: one waiter fdatasyncs everything written so far, for
//!   everyone, then wakes them all at once; whoever it did not cover takes
//!   the next turn.
//! - The store's writer thread moves records into SQLite in batches, without
//!   an fsync of their own, and writes in the same transaction the sequence
//!   number up to which every record is moved. Once a durable SQLite commit
//!   covers a segment, [`Intake::forget_through`] deletes it.
//! - With `sync: full` every name the journal creates is made durable
//!   before a record in it counts: a segment's (an fsync of the journal
//!   directory) and the journal directory's own (an fsync of the database's).
//! - A duplicate of a record not yet moved is answered only once that record
//!   is as durable as `store.sync` promises ([`Appended::Duplicate`] carries
//!   its sequence number); its key stays in memory until then even when the
//!   writer has moved it. After a failed fdatasync the journal refuses every
//!   append (503, duplicates included) until a restart: the page cache may
//!   have dropped the unsynced record, so nothing is answered on its strength.
//! - At open, [`Intake::open`] returns the records after that number. A
//!   segment's records end at a zero length. A bad frame followed only by
//!   zeros (or the end) is a torn last record (a crash in the middle of a
//!   write), never acknowledged, and dropped. A bad frame with valid frames
//!   after it is damage: recovery resynchronises to the next valid frame,
//!   logs the records skipped at ERROR, and once the rest is moved keeps the
//!   segment aside as `<segment>.log.damaged-<unix seconds>` (never deleted;
//!   counted by `relay_journal_damaged_segments`). Sequence numbers run on
//!   across segments, so records missing at the end of a segment (not yet
//!   moved) show as a gap before the next one: damage too. The next number
//!   is above every one seen, damaged segments included.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension};

use crate::config::SyncMode;
use crate::store::{NewPostback, StoreError};

/// The size segments are written out to beforehand; a segment is closed (and
/// the next one started) when a record does not fit, so segments covered by
/// SQLite can be deleted while the relay keeps writing.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Bytes before each record: its length and the CRC-32 of what follows.
const FRAME_HEADER: usize = 8;
/// What a damaged segment's name gets appended before its time.
const DAMAGED: &str = ".damaged-";

/// A record that is in the journal: what the writer thread moves into SQLite.
#[derive(Debug)]
pub(super) struct Journaled {
    /// Position in the journal; the writer's checkpoint counts these.
    pub seq: u64,
    /// The postback as accepted.
    pub postback: NewPostback,
}

/// What [`Intake::append`] did.
#[derive(Debug)]
pub(super) enum Appended {
    /// Written at this position.
    New(u64),
    /// A repeat within the window: nothing written. `seq` is the original's
    /// position when it is still in the journal: answer only once
    /// [`Intake::sync_through`] covers it.
    Duplicate {
        original_id: String,
        seq: Option<u64>,
    },
}

/// The journal of one SQLite database: `<database>.intake/<segment>.log`.
pub(super) struct Intake {
    dir: PathBuf,
    sync: SyncMode,
    /// Segment size written out beforehand ([`SEGMENT_BYTES`]; small in tests).
    segment_bytes: u64,
    dedupe_window_ms: i64,
    state: Mutex<Active>,
    /// Every record up to this sequence number is on disk (fdatasync'd).
    synced: AtomicU64,
    /// Set while someone is fdatasyncing for the others.
    flushing: AtomicBool,
    /// Wakes the others when an fdatasync ends.
    flushed: tokio::sync::Notify,
    /// Damaged segments kept aside in the journal's directory.
    damaged_segments: AtomicU64,
    /// Tests' stand-in for a slow or failing fdatasync, run before each one.
    #[cfg(test)]
    sync_fault: Mutex<Option<SyncFault>>,
}

#[cfg(test)]
type SyncFault = Box<dyn FnMut() -> io::Result<()> + Send>;

/// A segment no longer written.
#[derive(Debug, Clone, Copy)]
struct Closed {
    segment: u64,
    /// Its last sequence number: it goes once SQLite durably holds that far.
    last: u64,
    /// Recovery found damage in it: kept aside rather than deleted.
    damaged: bool,
}

/// A dedupe key journaled but not yet moved into SQLite (or moved before its
/// record was synced).
struct InFlight {
    id: String,
    accepted_at_ms: i64,
    seq: u64,
}

struct Active {
    file: Arc<File>,
    segment: u64,
    /// Where the next record goes in the current segment.
    len: u64,
    /// The next segment and its number, written out beforehand (see
    /// [`Intake::prepare_spare`]).
    spare: Option<(u64, File)>,
    /// The next segment number nobody has taken. A spare takes its number
    /// when its preparation starts, so a rotation that cannot wait for it
    /// takes another instead of colliding with the file being written.
    next_segment: u64,
    next_seq: u64,
    /// Segments no longer written, oldest first.
    closed: VecDeque<Closed>,
    /// Dedupe keys journaled but not yet moved into SQLite, or moved before
    /// their record was synced: a retry must wait for that sync.
    in_flight: HashMap<String, InFlight>,
    /// Keys moved into SQLite before their record was synced, with the
    /// record's sequence number: forgotten once the sync covers them.
    moved_unsynced: VecDeque<(u64, String)>,
    /// Reads SQLite's dedupe table for keys already moved.
    dedupe: Connection,
    /// Why the journal takes no more records (an fdatasync failed, leaving the
    /// page cache in an unknown state, or the store closed).
    failed: Option<String>,
    buffer: Vec<u8>,
}

impl Intake {
    /// Opens the journal beside `database`, starting a new segment, and
    /// returns the records after `moved_through` that earlier segments hold
    /// and the last sequence number written. The earlier segments stay until
    /// [`Intake::forget_through`] passes them.
    pub fn open(
        database: &Path,
        sync: SyncMode,
        dedupe_window_ms: i64,
        moved_through: u64,
        dedupe: Connection,
    ) -> Result<(Intake, Vec<Journaled>, u64), StoreError> {
        let dir = journal_dir(database);
        std::fs::create_dir_all(&dir).map_err(|err| io_error(&dir, &err))?;
        if sync == SyncMode::Full {
            // The journal directory's own name lives in the database's
            // directory: without this fsync a power cut can take a new
            // journal, acknowledged records and all (SQLite's fsyncs of that
            // directory are for its own files, and happen before this one).
            let parent = match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            sync_dir(parent)?;
        }
        let mut records = Vec::new();
        let mut closed: VecDeque<Closed> = VecDeque::new();
        let mut last_seq = moved_through;
        let mut last_segment = 0;
        // The last segment with records: its place in `closed` and last seq.
        let mut previous: Option<(usize, u64)> = None;
        for (segment, path) in segments(&dir)? {
            let bytes = std::fs::read(&path).map_err(|err| io_error(&path, &err))?;
            let found = decode_all(&bytes);
            // Sequence numbers run on from one segment to the next (a torn
            // record's is used again): a gap not yet moved into SQLite means
            // the end of the previous segment was damaged.
            if let (Some(first), Some((index, before))) = (found.records.first(), previous) {
                let floor = before.max(moved_through);
                if first.seq > floor + 1 {
                    closed[index].damaged = true;
                    tracing::error!(segment = %path.display(), records_skipped = first.seq - floor - 1,
                        "intake journal: records missing before this segment (the end of the previous one is damaged): acknowledged postbacks are lost; the previous segment is kept aside");
                }
            }
            if found.torn {
                tracing::warn!(segment = %path.display(),
                    "intake journal ends in a torn record (a crash mid-write); it was never acknowledged");
            }
            let damaged = found.skipped_bytes > 0;
            if damaged {
                tracing::error!(segment = %path.display(), records_skipped = found.skipped_records,
                    bytes_skipped = found.skipped_bytes,
                    "intake journal segment damaged in the middle: acknowledged postbacks in it are lost; the records after the damage are recovered and the segment is kept aside");
            }
            let segment_last = found.records.last().map_or(0, |record| record.seq);
            last_seq = last_seq.max(segment_last);
            records.extend(
                found
                    .records
                    .into_iter()
                    .filter(|record| record.seq > moved_through),
            );
            if segment_last > 0 {
                previous = Some((closed.len(), segment_last));
            }
            closed.push_back(Closed {
                segment,
                last: segment_last,
                damaged,
            });
            last_segment = segment;
        }
        let segment = last_segment + 1;
        let file = create_segment(&dir, segment, sync, SEGMENT_BYTES)?;
        let damaged_segments = damaged_aside(&dir)?;
        let intake = Intake {
            dir,
            sync,
            segment_bytes: SEGMENT_BYTES,
            dedupe_window_ms,
            state: Mutex::new(Active {
                file: Arc::new(file),
                segment,
                len: 0,
                spare: None,
                next_segment: segment + 1,
                next_seq: last_seq + 1,
                closed,
                in_flight: HashMap::new(),
                moved_unsynced: VecDeque::new(),
                dedupe,
                failed: None,
                buffer: Vec::with_capacity(16 * 1024),
            }),
            synced: AtomicU64::new(last_seq),
            flushing: AtomicBool::new(false),
            flushed: tokio::sync::Notify::new(),
            damaged_segments: AtomicU64::new(damaged_segments),
            #[cfg(test)]
            sync_fault: Mutex::new(None),
        };
        Ok((intake, records, last_seq))
    }

    /// Checks the dedupe window, then appends the postback.
    pub fn append(&self, postback: &NewPostback) -> Result<Appended, StoreError> {
        let mut state = self.lock();
        if let Some(reason) = &state.failed {
            return Err(StoreError::Database(reason.clone()));
        }
        if let Some(duplicate) = self.seen(&state, postback)? {
            return Ok(duplicate);
        }
        let seq = state.next_seq;
        let mut buffer = std::mem::take(&mut state.buffer);
        encode(seq, postback, &mut buffer);
        if state.len > 0 && state.len + buffer.len() as u64 > self.segment_bytes {
            if let Err(err) = self.rotate(&mut state) {
                state.buffer = buffer;
                return Err(err);
            }
        }
        // A partial record left by a failed write is overwritten by the
        // next one, or ends the segment as a torn record at recovery.
        let written = state.file.write_all_at(&buffer, state.len);
        let len = buffer.len() as u64;
        state.buffer = buffer;
        if let Err(err) = written {
            return Err(StoreError::Database(format!("intake journal: {err}")));
        }
        state.len += len;
        state.next_seq += 1;
        state.in_flight.insert(
            postback.dedupe_key.clone(),
            InFlight {
                id: postback.id.clone(),
                accepted_at_ms: postback.received_at_ms,
                seq,
            },
        );
        Ok(Appended::New(seq))
    }

    /// The first copy when `postback` repeats one within the dedupe window.
    fn seen(&self, state: &Active, postback: &NewPostback) -> Result<Option<Appended>, StoreError> {
        let earliest = postback.received_at_ms - self.dedupe_window_ms;
        if let Some(original) = state.in_flight.get(&postback.dedupe_key) {
            if original.accepted_at_ms >= earliest {
                return Ok(Some(Appended::Duplicate {
                    original_id: original.id.clone(),
                    seq: Some(original.seq),
                }));
            }
        }
        let stored: Option<(String, i64)> = state
            .dedupe
            .prepare_cached("SELECT event_id, accepted_at FROM dedupe WHERE key = ?1")
            .and_then(|mut statement| {
                statement
                    .query_row([&postback.dedupe_key], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(super::db_error)?;
        Ok(stored.and_then(|(original_id, at)| {
            (at >= earliest).then_some(Appended::Duplicate {
                original_id,
                seq: None,
            })
        }))
    }

    /// Whether the record `seq` is on disk as `store.sync` promises.
    fn is_synced(&self, seq: u64) -> bool {
        self.sync == SyncMode::Normal || self.synced.load(Ordering::Acquire) >= seq
    }

    /// Returns once the record `seq` is on disk as `store.sync` promises.
    pub async fn sync_through(&self, seq: u64) -> Result<(), StoreError> {
        if self.sync == SyncMode::Normal {
            return Ok(());
        }
        loop {
            // Listening before looking: an fdatasync that ends in between
            // still wakes this waiter.
            let flushed = self.flushed.notified();
            tokio::pin!(flushed);
            flushed.as_mut().enable();
            if self.is_synced(seq) {
                return Ok(());
            }
            let turn =
                self.flushing
                    .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire);
            if turn.is_err() {
                flushed.await;
                continue;
            }
            // Nothing awaits from here to the release: a caller that goes
            // away cannot leave the turn taken.
            let result = self.flush();
            self.flushing.store(false, Ordering::Release);
            self.flushed.notify_waiters();
            result?;
        }
    }

    /// fdatasyncs everything written so far.
    fn flush(&self) -> Result<(), StoreError> {
        let (file, through) = {
            let state = self.lock();
            if let Some(reason) = &state.failed {
                return Err(StoreError::Database(reason.clone()));
            }
            (state.file.clone(), state.next_seq - 1)
        };
        if let Err(err) = blocking(|| self.sync_file(&file)) {
            let reason = format!("intake journal fdatasync failed: {err}");
            self.lock().failed = Some(reason.clone());
            return Err(StoreError::Database(reason));
        }
        self.synced.fetch_max(through, Ordering::AcqRel);
        Ok(())
    }

    /// One fdatasync (preceded, in tests, by the injected fault).
    fn sync_file(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if let Some(fault) = self
            .sync_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            fault()?;
        }
        file.sync_data()
    }

    /// Forgets the dedupe keys of records now in SQLite, once their records
    /// are synced: until then a retry must still wait for that sync.
    pub fn moved<'a>(&self, postbacks: impl Iterator<Item = &'a NewPostback>) {
        let mut state = self.lock();
        let state = &mut *state;
        for postback in postbacks {
            let seq = match state.in_flight.get(&postback.dedupe_key) {
                Some(original) if original.id == postback.id => original.seq,
                _ => continue,
            };
            if self.is_synced(seq) {
                state.in_flight.remove(&postback.dedupe_key);
            } else {
                let key = postback.dedupe_key.clone();
                state.moved_unsynced.push_back((seq, key));
            }
        }
        while let Some((seq, _)) = state.moved_unsynced.front() {
            if !self.is_synced(*seq) {
                break;
            }
            let (seq, key) = state.moved_unsynced.pop_front().expect("a front exists");
            if state
                .in_flight
                .get(&key)
                .is_some_and(|entry| entry.seq == seq)
            {
                state.in_flight.remove(&key);
            }
        }
    }

    /// Deletes the closed segments whose records SQLite durably holds (keeps
    /// damaged ones aside).
    pub fn forget_through(&self, durable_seq: u64) {
        let done: Vec<Closed> = {
            let mut state = self.lock();
            let mut done = Vec::new();
            while let Some(&closed) = state.closed.front() {
                if closed.last > durable_seq {
                    break;
                }
                done.push(closed);
                state.closed.pop_front();
            }
            done
        };
        for closed in done {
            let path = segment_path(&self.dir, closed.segment);
            if closed.damaged {
                self.set_aside(&path);
            } else if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %err,
                    "could not delete a moved intake segment; it is read again at the next start");
            }
        }
    }

    /// Renames a damaged segment out of the journal's way, for an operator.
    fn set_aside(&self, path: &Path) {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let mut aside = path.as_os_str().to_owned();
        aside.push(format!("{DAMAGED}{since_epoch}"));
        let aside = PathBuf::from(aside);
        match std::fs::rename(path, &aside) {
            Ok(()) => {
                self.damaged_segments.fetch_add(1, Ordering::Relaxed);
                tracing::error!(segment = %aside.display(),
                    "damaged intake segment kept aside for inspection; delete it once examined");
            }
            Err(err) => tracing::error!(segment = %path.display(), error = %err,
                "could not set a damaged intake segment aside; it is read again at the next start"),
        }
    }

    /// How many damaged segments are kept aside in the journal's directory.
    pub fn damaged_segments(&self) -> u64 {
        self.damaged_segments.load(Ordering::Relaxed)
    }

    /// Takes no more records and deletes every segment when SQLite durably
    /// holds all of them (at a clean stop).
    pub fn close(&self, durable_seq: u64) {
        let everything = {
            let mut state = self.lock();
            state.failed = Some("the store is closed".into());
            let (segment, last) = (state.segment, state.next_seq - 1);
            let damaged = false;
            state.closed.push_back(Closed {
                segment,
                last,
                damaged,
            });
            if let Some((segment, _)) = state.spare.take() {
                state.closed.push_back(Closed {
                    segment,
                    last,
                    damaged,
                });
            }
            last
        };
        self.forget_through(durable_seq);
        if durable_seq < everything {
            tracing::warn!(
                "intake journal kept: records after {durable_seq} are moved at the next start"
            );
        }
    }

    /// Writes the next segment out beforehand unless it is ready. Called by
    /// the store's writer thread, off the answer path.
    pub fn prepare_spare(&self) {
        let next = {
            let mut state = self.lock();
            if state.spare.is_some() || state.failed.is_some() {
                return;
            }
            state.next_segment += 1;
            state.next_segment - 1
        };
        match create_segment(&self.dir, next, self.sync, self.segment_bytes) {
            Ok(file) => {
                let mut state = self.lock();
                if state.segment < next && state.spare.is_none() && state.failed.is_none() {
                    state.spare = Some((next, file));
                    return;
                }
                // The current segment moved past it meanwhile (a rotation
                // without a spare took a later number): it is never used.
                drop(state);
                let _ = std::fs::remove_file(segment_path(&self.dir, next));
            }
            Err(err) => {
                tracing::debug!(error = %err, "could not write the next intake segment out beforehand")
            }
        }
    }

    /// Why the journal takes no records, if it does not.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Closes the current segment and starts the next one.
    fn rotate(&self, state: &mut MutexGuard<'_, Active>) -> Result<(), StoreError> {
        if self.sync == SyncMode::Full {
            // The new segment's records must not count as synced before
            // the old segment's are.
            let file = state.file.clone();
            blocking(|| self.sync_file(&file)).map_err(|err| {
                let reason = format!("intake journal fdatasync failed: {err}");
                state.failed = Some(reason.clone());
                StoreError::Database(reason)
            })?;
            self.synced.fetch_max(state.next_seq - 1, Ordering::AcqRel);
        }
        let (next, file) = match state.spare.take() {
            Some(spare) => spare,
            // Not ready: a segment that grows (slower to sync) rather than a
            // wait on the answer path. Its own number, never the one a spare
            // being written out has taken.
            None => {
                let next = state.next_segment;
                state.next_segment += 1;
                (next, create_segment(&self.dir, next, self.sync, 0)?)
            }
        };
        let closed = Closed {
            segment: state.segment,
            last: state.next_seq - 1,
            damaged: false,
        };
        state.closed.push_back(closed);
        state.file = Arc::new(file);
        state.segment = next;
        state.len = 0;
        Ok(())
    }

    /// Makes every fdatasync run `fault` first: a slow disk (it blocks) or a
    /// failing one (it returns an error).
    #[cfg(test)]
    pub fn inject_sync_fault(&self, fault: impl FnMut() -> io::Result<()> + Send + 'static) {
        *self.sync_fault.lock().unwrap() = Some(Box::new(fault));
    }

    fn lock(&self) -> MutexGuard<'_, Active> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Runs blocking file work from an async task: in place on a multi-thread
/// runtime (the worker's other tasks move to another thread meanwhile), else
/// directly. Unlike `spawn_blocking` it adds no hand-off to the answer path.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Where the journal of `database` lives.
pub(super) fn journal_dir(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".intake");
    PathBuf::from(name)
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.log"))
}

/// The journal's segments in order.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| io_error(dir, &err))? {
        let path = entry.map_err(|err| io_error(dir, &err))?.path();
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
fn create_segment(
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
        .map_err(|err| io_error(&path, &err))?;
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
            file.set_len(0).map_err(|err| io_error(&path, &err))?;
        }
    }
    if sync == SyncMode::Full {
        // The new name must survive a power cut before records in it count.
        sync_dir(dir)?;
    }
    Ok(file)
}

/// fsyncs a directory: what makes the names created in it durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| io_error(dir, &err))
}

/// How many damaged segments earlier starts kept aside in `dir`.
fn damaged_aside(dir: &Path) -> Result<u64, StoreError> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).map_err(|err| io_error(dir, &err))? {
        let entry = entry.map_err(|err| io_error(dir, &err))?;
        if entry.file_name().to_string_lossy().contains(DAMAGED) {
            count += 1;
        }
    }
    Ok(count)
}

fn io_error(path: &Path, err: &std::io::Error) -> StoreError {
    StoreError::Database(format!("intake journal {}: {err}", path.display()))
}

/// Frames one record into `out`: length, CRC-32, then the fields.
fn encode(seq: u64, postback: &NewPostback, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&postback.received_at_ms.to_le_bytes());
    for field in [
        postback.id.as_bytes(),
        postback.dedupe_key.as_bytes(),
        &postback.envelope,
        &postback.raw_body,
    ] {
        put(out, field);
    }
    match &postback.content_type {
        None => out.push(0),
        Some(content_type) => {
            out.push(1);
            put(out, content_type.as_bytes());
        }
    }
    out.extend_from_slice(&(postback.targets.len() as u32).to_le_bytes());
    for target in &postback.targets {
        put(out, target.as_bytes());
    }
    let payload_len = (out.len() - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&out[FRAME_HEADER..]);
    out[..4].copy_from_slice(&payload_len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_le_bytes());
    out.extend_from_slice(field);
}

/// What recovery finds in a segment.
#[derive(Default)]
struct Decoded {
    /// Every valid record, in order.
    records: Vec<Journaled>,
    /// It ends in a bad frame with nothing valid after it: a record torn by
    /// a crash mid-write, never acknowledged.
    torn: bool,
    /// Damage with valid records after it: the sequence numbers missing
    /// between the records on either side, and the bytes stepped over.
    skipped_records: u64,
    skipped_bytes: u64,
}

/// Reads a segment's records. A zero length ends them (a written-out
/// segment); a bad frame is either a torn tail or damage, told apart by
/// whether a valid frame with a later sequence number follows it anywhere:
/// recovery then resumes there.
fn decode_all(bytes: &[u8]) -> Decoded {
    let mut decoded = Decoded::default();
    let mut at = 0;
    let mut last_seq = 0;
    while at < bytes.len() {
        let end_mark = bytes[at..].iter().take(4).all(|byte| *byte == 0);
        if !end_mark {
            if let Some((record, used)) = decode_one(&bytes[at..]).filter(|(r, _)| r.seq > last_seq)
            {
                last_seq = record.seq;
                decoded.records.push(record);
                at += used;
                continue;
            }
        }
        match resync(bytes, at + 1, last_seq) {
            Some((next, seq)) => {
                decoded.skipped_bytes += (next - at) as u64;
                if last_seq > 0 {
                    decoded.skipped_records += seq - last_seq - 1;
                }
                at = next;
            }
            None => {
                decoded.torn = !end_mark;
                break;
            }
        }
    }
    decoded
}

/// The first offset from `from` where a whole, valid record with a sequence
/// number above `after` starts, and that number. Zeros (the written-out rest
/// of a segment) are stepped over a word at a time.
fn resync(bytes: &[u8], from: usize, after: u64) -> Option<(usize, u64)> {
    let mut at = from;
    while at + FRAME_HEADER < bytes.len() {
        if bytes[at] == 0 && bytes[at..].iter().take(8).all(|byte| *byte == 0) {
            // A frame starts with a non-zero length: none starts in the
            // first five of eight zeros.
            at += 5;
            continue;
        }
        if let Some((record, _)) = decode_one(&bytes[at..]) {
            if record.seq > after {
                return Some((at, record.seq));
            }
        }
        at += 1;
    }
    None
}

/// The record framed at the start of `bytes`, and the frame's length.
fn decode_one(bytes: &[u8]) -> Option<(Journaled, usize)> {
    let mut frame = Cursor(bytes);
    let len = frame.u32()? as usize;
    let crc = frame.u32()?;
    let payload = frame.take(len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let mut fields = Cursor(payload);
    let seq = u64::from_le_bytes(fields.take(8)?.try_into().ok()?);
    let received_at_ms = i64::from_le_bytes(fields.take(8)?.try_into().ok()?);
    let id = fields.string()?;
    let dedupe_key = fields.string()?;
    let envelope = Bytes::copy_from_slice(fields.field()?);
    let raw_body = Bytes::copy_from_slice(fields.field()?);
    let content_type = match fields.take(1)? {
        [0] => None,
        _ => Some(fields.string()?),
    };
    let count = fields.u32()?;
    let targets = (0..count)
        .map(|_| fields.string())
        .collect::<Option<Vec<_>>>()?;
    let record = Journaled {
        seq,
        postback: NewPostback {
            id,
            dedupe_key,
            received_at_ms,
            envelope,
            raw_body,
            content_type,
            targets,
            leased_until_ms: None,
        },
    };
    Some((record, FRAME_HEADER + len))
}

/// Reads a record's fields in order.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn field(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.field()?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postback(id: &str, content_type: Option<&str>, targets: &[&str]) -> NewPostback {
        NewPostback {
            id: id.into(),
            dedupe_key: format!("MMS_MO|N401|{id}"),
            received_at_ms: 1_700_000_000_123,
            envelope: Bytes::from_static(b"{\"specversion\":\"1.0\"}"),
            raw_body: Bytes::from_static(b"<postback/>"),
            content_type: content_type.map(str::to_owned),
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
            leased_until_ms: Some(5),
        }
    }

    #[test]
    fn records_read_back_as_written_and_a_torn_tail_is_dropped() {
        let mut segment = Vec::new();
        let mut buffer = Vec::new();
        let written = [
            postback("a", Some("text/xml"), &["crm", "archive"]),
            postback("b", None, &[]),
        ];
        for (seq, record) in written.iter().enumerate() {
            encode(seq as u64 + 7, record, &mut buffer);
            segment.extend_from_slice(&buffer);
        }
        let whole = segment.len();
        encode(9, &postback("c", None, &["crm"]), &mut buffer);
        segment.extend_from_slice(&buffer[..buffer.len() - 3]);

        let decoded = decode_all(&segment);
        assert!(decoded.torn);
        assert_eq!(decoded.skipped_bytes, 0, "a torn tail is not damage");
        let read = decoded.records;
        assert_eq!(read.len(), 2);
        for (record, (seq, original)) in read.iter().zip([(7, &written[0]), (8, &written[1])]) {
            assert_eq!(record.seq, seq);
            let got = &record.postback;
            assert_eq!(got.id, original.id);
            assert_eq!(got.dedupe_key, original.dedupe_key);
            assert_eq!(got.received_at_ms, original.received_at_ms);
            assert_eq!(got.envelope, original.envelope);
            assert_eq!(got.raw_body, original.raw_body);
            assert_eq!(got.content_type, original.content_type);
            assert_eq!(got.targets, original.targets);
            assert_eq!(got.leased_until_ms, None, "a replayed job is not leased");
        }
        assert!(!decode_all(&segment[..whole]).torn);
        // Zeros after the last record (a written-out segment) end it cleanly.
        let mut written_out = segment[..whole].to_vec();
        written_out.extend_from_slice(&[0; 4096]);
        let decoded = decode_all(&written_out);
        assert_eq!((decoded.records.len(), decoded.torn), (2, false));
        assert_eq!(decoded.skipped_bytes, 0);
        // A torn last record in a written-out segment is still only torn.
        let mut torn_out = segment.clone();
        torn_out.extend_from_slice(&[0; 4096]);
        let decoded = decode_all(&torn_out);
        assert_eq!(
            (decoded.records.len(), decoded.torn, decoded.skipped_bytes),
            (2, true, 0)
        );
    }

    /// `count` records (sequence numbers 1…) framed one after the other,
    /// followed by zeros as in a written-out segment; and where each starts.
    fn segment_of(count: u64) -> (Vec<u8>, Vec<usize>) {
        let (mut segment, mut starts, mut buffer) = (Vec::new(), Vec::new(), Vec::new());
        for seq in 1..=count {
            encode(
                seq,
                &postback(&format!("p{seq}"), None, &["crm"]),
                &mut buffer,
            );
            starts.push(segment.len());
            segment.extend_from_slice(&buffer);
        }
        segment.extend_from_slice(&[0; 64 * 1024]);
        (segment, starts)
    }

    fn ids(records: &[Journaled]) -> Vec<&str> {
        records.iter().map(|r| r.postback.id.as_str()).collect()
    }

    #[test]
    fn damage_in_the_middle_is_stepped_over_to_the_next_valid_record() {
        // A flipped bit in the second of five records.
        let (mut segment, starts) = segment_of(5);
        segment[starts[1] + 20] ^= 0x40;
        let decoded = decode_all(&segment);
        assert_eq!(ids(&decoded.records), ["p1", "p3", "p4", "p5"]);
        assert!(!decoded.torn);
        assert_eq!(decoded.skipped_records, 1);
        assert_eq!(decoded.skipped_bytes, (starts[2] - starts[1]) as u64);

        // A zeroed block over the second and third records' starts: the
        // zeros look like the end of the records, but valid ones follow.
        let (mut segment, starts) = segment_of(5);
        segment[starts[1]..starts[2] + 10].fill(0);
        let decoded = decode_all(&segment);
        assert_eq!(ids(&decoded.records), ["p1", "p4", "p5"]);
        assert_eq!((decoded.skipped_records, decoded.torn), (2, false));

        // A bad length in the first record.
        let (mut segment, starts) = segment_of(3);
        segment[starts[0] + 1] ^= 0x01;
        let decoded = decode_all(&segment);
        assert_eq!(ids(&decoded.records), ["p2", "p3"]);
        assert!(decoded.skipped_bytes > 0);
    }

    #[test]
    fn a_flipped_bit_in_the_last_record_is_a_torn_tail() {
        let (mut segment, starts) = segment_of(2);
        segment[starts[1] + 20] ^= 0x40;
        let decoded = decode_all(&segment);
        assert_eq!(ids(&decoded.records), ["p1"]);
        assert!(decoded.torn);
        assert_eq!(decoded.skipped_bytes, 0);
    }

    /// A database with the dedupe table the journal reads.
    fn dedupe_db(dir: &Path) -> PathBuf {
        let database = dir.join("relay.db");
        Connection::open(&database)
            .unwrap()
            .execute_batch(
                "CREATE TABLE dedupe (key TEXT PRIMARY KEY, event_id TEXT NOT NULL, accepted_at INTEGER NOT NULL)",
            )
            .unwrap();
        database
    }

    fn open_intake(database: &Path, moved_through: u64) -> (Intake, Vec<Journaled>, u64) {
        let dedupe = Connection::open(database).unwrap();
        match Intake::open(database, SyncMode::Normal, 60_000, moved_through, dedupe) {
            Ok(opened) => opened,
            Err(err) => panic!("open: {err}"),
        }
    }

    fn appended(intake: &Intake, postback: &NewPostback) -> u64 {
        match intake.append(postback) {
            Ok(Appended::New(seq)) => seq,
            other => panic!("append {}: {other:?}", postback.id),
        }
    }

    #[test]
    fn recovery_keeps_the_records_after_damage_and_sets_the_segment_aside() {
        let dir = tempfile::tempdir().unwrap();
        let database = dedupe_db(dir.path());
        let (intake, records, _) = open_intake(&database, 0);
        assert!(records.is_empty());
        for n in 1..=5 {
            assert_eq!(appended(&intake, &postback(&format!("p{n}"), None, &[])), n);
        }
        drop(intake); // a crash: the segment stays
        let journal = journal_dir(&database);
        let (segment, path) = segments(&journal).unwrap().remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let mut buffer = Vec::new();
        encode(1, &postback("p1", None, &[]), &mut buffer);
        bytes[buffer.len() + 30] ^= 0x08; // inside the second record
        std::fs::write(&path, &bytes).unwrap();

        let (intake, records, last) = open_intake(&database, 0);
        assert_eq!(ids(&records), ["p1", "p3", "p4", "p5"]);
        assert_eq!(last, 5);
        // The records are moved into SQLite, then the segment goes: aside.
        intake.forget_through(last);
        assert!(!path.exists(), "no longer read as a segment");
        let aside: Vec<String> = std::fs::read_dir(&journal)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert!(aside[0].starts_with(&format!("{segment:020}.log.damaged-")));
        assert_eq!(intake.damaged_segments(), 1);
        // No sequence number is used twice.
        assert_eq!(appended(&intake, &postback("p6", None, &[])), 6);
        drop(intake);

        // The next start recovers only the new record, and still counts the
        // segment kept aside.
        let (intake, records, last) = open_intake(&database, 5);
        assert_eq!((ids(&records), last), (vec!["p6"], 6));
        assert_eq!(intake.damaged_segments(), 1);
    }

    #[test]
    fn records_missing_at_the_end_of_a_segment_are_damage_when_later_ones_follow() {
        let dir = tempfile::tempdir().unwrap();
        let database = dedupe_db(dir.path());
        let (mut intake, _, _) = open_intake(&database, 0);
        intake.segment_bytes = 1024;
        let mut record = postback("p", None, &[]);
        record.raw_body = Bytes::from(vec![b'x'; 400]);
        for n in 1..=4 {
            record.id = format!("p{n}");
            record.dedupe_key = record.id.clone();
            appended(&intake, &record);
        }
        drop(intake);
        let journal = journal_dir(&database);
        let found = segments(&journal).unwrap();
        assert_eq!(found.len(), 2, "two records a segment");
        // The first segment's second record is zeroed out: it reads as a
        // clean end, but the next segment starts at 3.
        let mut bytes = std::fs::read(&found[0].1).unwrap();
        let mut buffer = Vec::new();
        encode(1, &record, &mut buffer);
        bytes[buffer.len()..].fill(0);
        std::fs::write(&found[0].1, &bytes).unwrap();

        let (intake, records, last) = open_intake(&database, 0);
        assert_eq!((ids(&records), last), (vec!["p1", "p3", "p4"], 4));
        intake.forget_through(last);
        assert!(!found[0].1.exists() && !found[1].1.exists());
        assert_eq!(intake.damaged_segments(), 1, "the first one, kept aside");
        drop(intake);

        // Records already moved into SQLite are not missing: a torn tail
        // before a segment that starts after them is no damage.
        let dir = tempfile::tempdir().unwrap();
        let database = dedupe_db(dir.path());
        let (mut intake, _, _) = open_intake(&database, 0);
        intake.segment_bytes = 1024;
        for n in 1..=4 {
            record.id = format!("p{n}");
            record.dedupe_key = record.id.clone();
            appended(&intake, &record);
        }
        drop(intake);
        let found = segments(&journal_dir(&database)).unwrap();
        std::fs::write(&found[0].1, &bytes).unwrap();
        let (intake, records, _) = open_intake(&database, 2);
        assert_eq!(ids(&records), ["p3", "p4"]);
        intake.forget_through(4);
        assert_eq!(intake.damaged_segments(), 0);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_its_segment_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let database = dedupe_db(dir.path());
        let (intake, _, _) = open_intake(&database, 0);
        for n in 1..=3 {
            appended(&intake, &postback(&format!("p{n}"), None, &[]));
        }
        drop(intake);
        let (_, path) = segments(&journal_dir(&database)).unwrap().remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let end = bytes.iter().rposition(|byte| *byte != 0).unwrap();
        bytes[end - 5] ^= 0x10; // inside the last record
        std::fs::write(&path, &bytes).unwrap();

        let (intake, records, last) = open_intake(&database, 0);
        assert_eq!((ids(&records), last), (vec!["p1", "p2"], 2));
        intake.forget_through(last);
        assert!(!path.exists());
        assert_eq!(intake.damaged_segments(), 0);
        let left: Vec<_> = std::fs::read_dir(journal_dir(&database))
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the new segment: {left:?}");
    }

    #[test]
    fn rotations_never_collide_with_the_spare_being_written_out() {
        let dir = tempfile::tempdir().unwrap();
        let database = dedupe_db(dir.path());
        let (mut intake, _, _) = open_intake(&database, 0);
        // Small segments: a rotation every few records.
        intake.segment_bytes = 64 * 1024;
        let intake = Arc::new(intake);
        let done = Arc::new(AtomicBool::new(false));
        let spare = {
            let (intake, done) = (intake.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    intake.prepare_spare();
                }
            })
        };
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let intake = intake.clone();
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    for n in 0..150 {
                        let mut record = postback(&format!("w{writer}-{n}"), None, &[]);
                        record.raw_body = Bytes::from(vec![b'x'; 20 * 1024]);
                        if let Err(err) = intake.append(&record) {
                            failures.push(err.to_string());
                        }
                    }
                    failures
                })
            })
            .collect();
        let failures: Vec<String> = writers
            .into_iter()
            .flat_map(|writer| writer.join().unwrap())
            .collect();
        done.store(true, Ordering::Relaxed);
        spare.join().unwrap();
        assert_eq!(failures, Vec::<String>::new());
        drop(intake);
        let (_, records, last) = open_intake(&database, 0);
        assert_eq!((records.len(), last), (600, 600), "every record recovered");
    }
}
