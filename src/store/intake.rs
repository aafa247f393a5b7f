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
//! - At open, [`Intake::open`] returns the records after that number. A
//!   segment ends at its first zero length; a torn last record (a crash in
//!   the middle of a write) was never acknowledged and is dropped.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension};

use super::{Acceptance, NewPostback, StoreError};
use crate::config::SyncMode;

/// The size segments are written out to beforehand; a segment is closed (and
/// the next one started) when a record does not fit, so segments covered by
/// SQLite can be deleted while the relay keeps writing.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Bytes before each record: its length and the CRC-32 of what follows.
const FRAME_HEADER: usize = 8;

/// A record that is in the journal: what the writer thread moves into SQLite.
#[derive(Debug)]
pub(super) struct Journaled {
    /// Position in the journal; the writer's checkpoint counts these.
    pub seq: u64,
    /// The postback as accepted.
    pub postback: NewPostback,
}

/// The journal of one SQLite database: `<database>.intake/<segment>.log`.
pub(super) struct Intake {
    dir: PathBuf,
    sync: SyncMode,
    dedupe_window_ms: i64,
    state: Mutex<Active>,
    /// Every record up to this sequence number is on disk (fdatasync'd).
    synced: AtomicU64,
    /// Set while someone is fdatasyncing for the others.
    flushing: AtomicBool,
    /// Wakes the others when an fdatasync ends.
    flushed: tokio::sync::Notify,
}

struct Active {
    file: Arc<File>,
    segment: u64,
    /// Where the next record goes in the current segment.
    len: u64,
    /// The next segment, written out beforehand (see [`Intake::prepare_spare`]).
    spare: Option<File>,
    next_seq: u64,
    /// Segments no longer written, oldest first, with their last sequence
    /// number: deleted once SQLite durably holds that far.
    closed: VecDeque<(u64, u64)>,
    /// Dedupe keys journaled but not yet moved into SQLite: key → (envelope
    /// id, accepted at).
    in_flight: HashMap<String, (String, i64)>,
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
        let mut closed = VecDeque::new();
        let mut last_seq = moved_through;
        let mut last_segment = 0;
        for (segment, path) in segments(&dir)? {
            let bytes = std::fs::read(&path).map_err(|err| io_error(&path, &err))?;
            let (found, torn) = decode_all(&bytes);
            if torn {
                tracing::warn!(segment = %path.display(),
                    "intake journal ends in a torn record (a crash mid-write); it was never acknowledged");
            }
            let segment_last = found.last().map_or(0, |record| record.seq);
            last_seq = last_seq.max(segment_last);
            records.extend(
                found
                    .into_iter()
                    .filter(|record| record.seq > moved_through),
            );
            closed.push_back((segment, segment_last));
            last_segment = segment;
        }
        let segment = last_segment + 1;
        let file = create_segment(&dir, segment, sync, true)?;
        let intake = Intake {
            dir,
            sync,
            dedupe_window_ms,
            state: Mutex::new(Active {
                file: Arc::new(file),
                segment,
                len: 0,
                spare: None,
                next_seq: last_seq + 1,
                closed,
                in_flight: HashMap::new(),
                dedupe,
                failed: None,
                buffer: Vec::with_capacity(16 * 1024),
            }),
            synced: AtomicU64::new(last_seq),
            flushing: AtomicBool::new(false),
            flushed: tokio::sync::Notify::new(),
        };
        Ok((intake, records, last_seq))
    }

    /// Checks the dedupe window, then appends the postback. `Ok(Err(..))` is
    /// a duplicate (nothing written); `Ok(Ok(seq))` the record's position.
    pub fn append(&self, postback: &NewPostback) -> Result<Result<u64, Acceptance>, StoreError> {
        let mut state = self.lock();
        if let Some(reason) = &state.failed {
            return Err(StoreError::Database(reason.clone()));
        }
        if let Some(original_id) = self.seen(&state, postback)? {
            return Ok(Err(Acceptance::Duplicate { original_id }));
        }
        let seq = state.next_seq;
        let mut buffer = std::mem::take(&mut state.buffer);
        encode(seq, postback, &mut buffer);
        if state.len > 0 && state.len + buffer.len() as u64 > SEGMENT_BYTES {
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
            (postback.id.clone(), postback.received_at_ms),
        );
        Ok(Ok(seq))
    }

    /// The first copy's envelope id when `postback` repeats one within the
    /// dedupe window.
    fn seen(&self, state: &Active, postback: &NewPostback) -> Result<Option<String>, StoreError> {
        let earliest = postback.received_at_ms - self.dedupe_window_ms;
        if let Some((id, at)) = state.in_flight.get(&postback.dedupe_key) {
            if *at >= earliest {
                return Ok(Some(id.clone()));
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
            .map_err(super::sqlite::db_error)?;
        Ok(stored.and_then(|(id, at)| (at >= earliest).then_some(id)))
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
            if self.synced.load(Ordering::Acquire) >= seq {
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
        if let Err(err) = blocking(|| file.sync_data()) {
            let reason = format!("intake journal fdatasync failed: {err}");
            self.lock().failed = Some(reason.clone());
            return Err(StoreError::Database(reason));
        }
        self.synced.fetch_max(through, Ordering::AcqRel);
        Ok(())
    }

    /// Forgets the dedupe keys of records now in SQLite.
    pub fn moved<'a>(&self, postbacks: impl Iterator<Item = &'a NewPostback>) {
        let mut state = self.lock();
        for postback in postbacks {
            if state
                .in_flight
                .get(&postback.dedupe_key)
                .is_some_and(|(id, _)| *id == postback.id)
            {
                state.in_flight.remove(&postback.dedupe_key);
            }
        }
    }

    /// Deletes the closed segments whose records SQLite durably holds.
    pub fn forget_through(&self, durable_seq: u64) {
        let done: Vec<u64> = {
            let mut state = self.lock();
            let mut done = Vec::new();
            while let Some(&(segment, last)) = state.closed.front() {
                if last > durable_seq {
                    break;
                }
                done.push(segment);
                state.closed.pop_front();
            }
            done
        };
        for segment in done {
            let path = segment_path(&self.dir, segment);
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %err,
                    "could not delete a moved intake segment; it is read again at the next start");
            }
        }
    }

    /// Takes no more records and deletes every segment when SQLite durably
    /// holds all of them (at a clean stop).
    pub fn close(&self, durable_seq: u64) {
        let everything = {
            let mut state = self.lock();
            state.failed = Some("the store is closed".into());
            let (segment, last) = (state.segment, state.next_seq - 1);
            state.closed.push_back((segment, last));
            if state.spare.take().is_some() {
                state.closed.push_back((segment + 1, last));
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
            let state = self.lock();
            if state.spare.is_some() || state.failed.is_some() {
                return;
            }
            state.segment + 1
        };
        match create_segment(&self.dir, next, self.sync, true) {
            Ok(file) => {
                let mut state = self.lock();
                if state.segment + 1 == next && state.spare.is_none() {
                    state.spare = Some(file);
                    return;
                }
                // The current segment moved on meanwhile (a rotation without
                // a spare): this one is behind it and never used.
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
            blocking(|| file.sync_data()).map_err(|err| {
                let reason = format!("intake journal fdatasync failed: {err}");
                state.failed = Some(reason.clone());
                StoreError::Database(reason)
            })?;
            self.synced.fetch_max(state.next_seq - 1, Ordering::AcqRel);
        }
        let next = state.segment + 1;
        let file = match state.spare.take() {
            Some(file) => file,
            // Not ready: a segment that grows (slower to sync) rather than a
            // wait on the answer path.
            None => create_segment(&self.dir, next, self.sync, false)?,
        };
        let closed = (state.segment, state.next_seq - 1);
        state.closed.push_back(closed);
        state.file = Arc::new(file);
        state.segment = next;
        state.len = 0;
        Ok(())
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

/// Creates segment `segment`, written out to [`SEGMENT_BYTES`] of zeros when
/// `write_out` and the disk has room for several segments (else it grows as
/// records come).
fn create_segment(
    dir: &Path,
    segment: u64,
    sync: SyncMode,
    write_out: bool,
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
    if write_out && room >= 4 * SEGMENT_BYTES {
        let zeros = vec![0u8; 1024 * 1024];
        let written = (0..SEGMENT_BYTES / zeros.len() as u64)
            .try_for_each(|_| (&file).write_all(&zeros))
            .and_then(|()| file.sync_all());
        if let Err(err) = written {
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

/// Every whole record of a segment, and whether it ends in a torn one.
fn decode_all(mut bytes: &[u8]) -> (Vec<Journaled>, bool) {
    let mut records = Vec::new();
    // A zero length is where the records end in a written-out segment.
    while !bytes.is_empty() && !bytes.starts_with(&[0; 4]) {
        let Some(record) = decode_one(&mut bytes) else {
            return (records, true);
        };
        records.push(record);
    }
    (records, false)
}

fn decode_one(bytes: &mut &[u8]) -> Option<Journaled> {
    let mut frame = Cursor(bytes);
    let len = frame.u32()? as usize;
    let crc = frame.u32()?;
    let payload = frame.take(len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    *bytes = frame.0;
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
    Some(Journaled {
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
    })
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

        let (read, torn) = decode_all(&segment);
        assert!(torn);
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
        assert!(!decode_all(&segment[..whole]).1);
        // Zeros after the last record (a written-out segment) end it cleanly.
        let mut written_out = segment[..whole].to_vec();
        written_out.extend_from_slice(&[0; 4096]);
        let (read, torn) = decode_all(&written_out);
        assert_eq!((read.len(), torn), (2, false));
    }

    #[test]
    fn a_flipped_bit_ends_the_segment_there() {
        let mut buffer = Vec::new();
        encode(1, &postback("a", None, &["crm"]), &mut buffer);
        let mut segment = buffer.clone();
        encode(2, &postback("b", None, &["crm"]), &mut buffer);
        let second = segment.len();
        segment.extend_from_slice(&buffer);
        segment[second + 20] ^= 0x40;
        let (read, torn) = decode_all(&segment);
        assert!(torn);
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].postback.id, "a");
    }
}
