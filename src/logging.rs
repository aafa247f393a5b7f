//! Log lines go to stderr in batches, written by a thread that wakes on a
//! timer.
//!
//! Why not a channel to a writer thread (`tracing-appender`, used before):
//! the relay logs about three lines per postback (its arrival and one per
//! delivery attempt), and on serial traffic every line woke the parked writer
//! thread: a futex call on the request's path and a wake-up of an idle vCPU,
//! which costs tens of µs on these VMs. Here a line is appended to a shared
//! buffer under a mutex (no system call); the thread writes whatever has
//! gathered every `FLUSH_EVERY`, or sooner when much has. Nothing is
//! dropped: past `WRITE_THROUGH_AT` (stderr not keeping up) a logger writes
//! the buffer itself. At exit the guard writes what is left; a SIGKILL loses
//! at most the last `FLUSH_EVERY` of lines.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long a line waits in the buffer at most.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// The writer thread is woken early when this much has gathered.
const WAKE_AT: usize = 256 * 1024;
/// Loggers write to stderr themselves when this much is waiting.
const WRITE_THROUGH_AT: usize = 8 * 1024 * 1024;

struct Shared {
    buffer: Mutex<Vec<u8>>,
    wake: Condvar,
    stopping: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            buffer: Mutex::new(Vec::with_capacity(64 * 1024)),
            wake: Condvar::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A handle loggers write through (one per log line, see `MakeWriter`).
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

impl Write for BatchWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut buffer = self.0.lock();
        buffer.extend_from_slice(bytes);
        if buffer.len() >= WRITE_THROUGH_AT {
            let result = std::io::stderr().lock().write_all(&buffer);
            buffer.clear();
            result?;
        } else if buffer.len() >= WAKE_AT {
            self.0.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keeps the writer thread; dropping it writes what is left and stops it.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogGuard {
    /// Starts the writer thread; give [`LogGuard::writer`] to the subscriber.
    pub fn start() -> LogGuard {
        let shared = Shared::new();
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_batches(&for_thread))
            .ok();
        LogGuard { shared, thread }
    }

    /// A writer for `tracing_subscriber`'s `with_writer`.
    pub fn writer(&self) -> impl Fn() -> BatchWriter + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || BatchWriter(shared.clone())
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.wake.notify_one();
        match self.thread.take() {
            Some(thread) => drop(thread.join()),
            // No thread could be started: write what gathered here.
            None => drop(std::io::stderr().write_all(&self.shared.lock())),
        }
    }
}

fn write_batches(shared: &Shared) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let stopping = {
            let buffer = shared.lock();
            let (mut buffer, _) = shared
                .wake
                .wait_timeout(buffer, FLUSH_EVERY)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::swap(&mut *buffer, &mut batch);
            shared.stopping.load(std::sync::atomic::Ordering::Acquire)
        };
        if !batch.is_empty() {
            // Nowhere to report a failed write to stderr.
            let _ = std::io::stderr().lock().write_all(&batch);
            batch.clear();
        }
        if stopping {
            let rest = std::mem::take(&mut *shared.lock());
            let _ = std::io::stderr().lock().write_all(&rest);
            return;
        }
    }
}

/// At most one log line per `every` for an event a flood can repeat at will
/// (refused connections, wrong credentials): the metrics count every one, the
/// log says that it happens without becoming a disk filler.
pub struct LogThrottle {
    every: Duration,
    /// When the last line was let through, and how many were held back since.
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogThrottle {
    /// A throttle letting one line through per `every`.
    pub const fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back)` when a line may be written now (with the number of
    /// events not logged since the last line), `None` when it must not.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period_and_counts_the_rest() {
        let throttle = LogThrottle::new(Duration::from_millis(200));
        assert_eq!(throttle.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.admit(), Some(1000));
        assert_eq!(throttle.admit(), None);
    }

    #[test]
    fn lines_wait_in_the_buffer_until_the_writer_takes_them() {
        let guard = LogGuard {
            shared: Shared::new(),
            thread: None,
        };
        let mut writer = (guard.writer())();
        writer.write_all(b"one line\n").unwrap();
        writer.write_all(b"two\n").unwrap();
        assert_eq!(&guard.shared.lock()[..], b"one line\ntwo\n");
        // The writer thread swaps the buffer out and leaves it empty.
        let shared = guard.shared.clone();
        let mut guard = guard;
        guard.thread = std::thread::Builder::new()
            .spawn(move || write_batches(&shared))
            .ok();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !guard.shared.lock().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
