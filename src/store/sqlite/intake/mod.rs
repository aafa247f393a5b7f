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

mod frame;
mod segments;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension};

use crate::config::SyncMode;
use crate::store::{NewPostback, StoreError};

use self::frame::{decode_all, encode};
use self::segments::{create_segment, damaged_aside, io_error, segment_path, segments};
pub(super) use self::segments::{journal_dir, sync_dir};

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
        std::fs::create_dir_all(&dir).map_err(|err| io_error(&dir, err))?;
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
            let bytes = std::fs::read(&path).map_err(|err| io_error(&path, err))?;
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
            return Err(StoreError::database(reason.clone()));
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
            return Err(StoreError::database_from(
                format!("intake journal: {err}"),
                err,
            ));
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
                return Err(StoreError::database(reason.clone()));
            }
            (state.file.clone(), state.next_seq - 1)
        };
        if let Err(err) = blocking(|| self.sync_file(&file)) {
            let reason = format!("intake journal fdatasync failed: {err}");
            self.lock().failed = Some(reason.clone());
            return Err(StoreError::database_from(reason, err));
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
                StoreError::database_from(reason, err)
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
