//! Test support: a FUSE file system that keeps what was not fsynced in memory
//! and drops it when the "power" is cut.
//!
//! Why: `kill -9` proves only that a process crash loses nothing, because the
//! kernel's page cache survives it. A power loss also drops every write,
//! size change, create, rename and unlink that no fsync made durable. The
//! relay promises "200 means on disk" with `store.sync: full`, so its suite
//! must be able to cut the power under load; [`Volume`] is that switch.
//!
//! The rules of durability are in `src/model.rs` (stricter than Jepsen's
//! LazyFS: directory entries need a directory fsync). It runs on fuser's
//! pure-Rust mount (no libfuse to link): as root the mount is a plain
//! `mount(2)`, else fuser falls back to `fusermount3` (Debian: fuse3). It
//! needs `/dev/fuse`.

mod fuse;
mod model;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption};

use crate::fuse::{LossyFs, Shared};
use crate::model::{Model, Power};

/// How long an unmount waits for killed programs to let go of the volume.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks what mounting needs, and says what to install when it is missing:
/// a test that cannot mount fails with this text (never skips silently).
pub fn prerequisites() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the power-loss tests mount a FUSE file system: run them as root (CI does)".into(),
        );
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse is missing: load the fuse kernel module (modprobe fuse) or give the \
                    container the device (--device /dev/fuse --cap-add SYS_ADMIN)"
                .into(),
        );
    }
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("fusermount3").is_file())
    });
    if !on_path {
        return Err("fusermount3 is missing: install Debian's package fuse3 \
                    (apt-get install fuse3; .ci/run does it)"
            .into());
    }
    Ok(())
}

/// A mounted lossy file system. The power can be cut any number of times;
/// it is unmounted when dropped.
pub struct Volume {
    mountpoint: PathBuf,
    shared: Arc<Shared>,
    session: Option<BackgroundSession>,
}

impl Volume {
    /// Mounts an empty file system on `mountpoint` (an existing directory).
    pub fn mount(mountpoint: &Path) -> io::Result<Volume> {
        prerequisites().map_err(io::Error::other)?;
        let mut volume = Volume {
            mountpoint: mountpoint.to_owned(),
            shared: Arc::new(Shared {
                model: Mutex::new(Model::new()),
                power_changed: Condvar::new(),
            }),
            session: None,
        };
        volume.attach()?;
        Ok(volume)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The first instant of the power cut: from now on every request waits
    /// (nothing lands, nothing becomes durable, nobody hears back) until
    /// [`Volume::power_cut`] fails it. Freeze, then SIGKILL the programs
    /// using the volume (without waiting for them: a process in the middle
    /// of a request exits only once it is answered), then cut.
    pub fn freeze(&self) {
        self.shared.set_power(Power::Frozen);
    }

    /// Cuts the power and brings it back: fails every request (EIO), so
    /// killed programs can exit; unmounts once they have (dropping every
    /// kernel cache); discards every unsynced byte, size change and directory
    /// entry; and mounts the durable state again at the same place.
    pub fn power_cut(&mut self) -> io::Result<()> {
        self.shared.set_power(Power::Off);
        self.detach()?;
        self.shared.lock().cut();
        self.attach()
    }

    fn attach(&mut self) -> io::Result<()> {
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lossyfs".into())];
        let fs = LossyFs {
            shared: self.shared.clone(),
            // SAFETY: getuid/getgid have no preconditions and cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
        };
        self.session = Some(fuser::spawn_mount(fs, &self.mountpoint, &config)?);
        Ok(())
    }

    /// Unmounts, waiting (bounded) while killed programs still hold files
    /// open, and waits for the session thread to end.
    fn detach(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let path =
            CString::new(self.mountpoint.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let deadline = Instant::now() + UNMOUNT_TIMEOUT;
        loop {
            // SAFETY: `path` is a valid NUL-terminated string.
            if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) || Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "cannot unmount {}: {err}",
                    self.mountpoint.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Unmounted: the session reads ENODEV and ends.
        session.join()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

#[cfg(test)]
mod tests {
    //! The file system bites: each rule of durability, through the kernel.

    use std::fs::{self, File};
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    fn mounted() -> (tempfile::TempDir, Volume) {
        let dir = tempfile::tempdir().unwrap();
        let volume =
            Volume::mount(dir.path()).unwrap_or_else(|err| panic!("cannot mount lossyfs: {err}"));
        (dir, volume)
    }

    fn sync_dir(path: &Path) {
        File::open(path).unwrap().sync_all().unwrap();
    }

    #[test]
    fn written_but_not_fsynced_data_is_gone_after_a_cut() {
        let (_dir, mut volume) = mounted();
        let path = volume.path().join("f");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"durable").unwrap();
        file.sync_data().unwrap();
        sync_dir(volume.path());
        file.write_all(b" and lost").unwrap();
        file.write_at(b"D", 0).unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"Durable and lost");
        volume.power_cut().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"durable");
    }

    #[test]
    fn nothing_written_after_the_freeze_lands() {
        let (_dir, mut volume) = mounted();
        let path = volume.path().join("f");
        let file = File::create(&path).unwrap();
        sync_dir(volume.path());
        volume.freeze();
        let late = std::thread::spawn(move || {
            file.write_all_at(b"late", 0)
                .and_then(|()| file.sync_data())
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !late.is_finished(),
            "a request waits while the power is going"
        );
        volume.power_cut().unwrap();
        assert!(late.join().unwrap().is_err(), "and fails once it is off");
        assert_eq!(fs::read(&path).unwrap(), b"");
    }

    #[test]
    fn a_rename_without_a_directory_fsync_is_undone_by_a_cut() {
        let (_dir, mut volume) = mounted();
        let (old, new) = (volume.path().join("old"), volume.path().join("new"));
        fs::write(&old, b"x").unwrap();
        File::open(&old).unwrap().sync_all().unwrap();
        sync_dir(volume.path());
        fs::rename(&old, &new).unwrap();
        volume.power_cut().unwrap();
        assert!(old.exists() && !new.exists(), "the rename was not durable");
        fs::rename(&old, &new).unwrap();
        sync_dir(volume.path());
        volume.power_cut().unwrap();
        assert!(!old.exists() && new.exists(), "the rename was made durable");
    }

    #[test]
    fn a_fsynced_file_in_a_directory_never_fsynced_disappears() {
        let (_dir, mut volume) = mounted();
        let path = volume.path().join("orphan");
        let file = File::create(&path).unwrap();
        file.write_all_at(b"synced", 0).unwrap();
        file.sync_all().unwrap();
        drop(file);
        volume.power_cut().unwrap();
        assert!(!path.exists(), "its name was never made durable");
        // An unlink, too, needs the directory's fsync.
        fs::write(&path, b"kept").unwrap();
        File::open(&path).unwrap().sync_all().unwrap();
        sync_dir(volume.path());
        fs::remove_file(&path).unwrap();
        volume.power_cut().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"kept");
    }

    #[test]
    fn fsynced_data_sizes_and_entries_survive_a_cut() {
        let (_dir, mut volume) = mounted();
        let sub = volume.path().join("sub");
        fs::create_dir(&sub).unwrap();
        sync_dir(volume.path());
        let path = sub.join("f");
        let file = File::create(&path).unwrap();
        file.write_all_at(&[7u8; 100_000], 0).unwrap();
        file.set_len(50_000).unwrap();
        file.write_all_at(b"end", 60_000).unwrap();
        file.sync_data().unwrap();
        sync_dir(&sub);
        drop(file);
        let before = fs::read(&path).unwrap();
        assert_eq!(before.len(), 60_003);
        volume.power_cut().unwrap();
        assert_eq!(fs::read(&path).unwrap(), before);
        assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
    }

    #[test]
    fn sqlite_in_wal_mode_keeps_its_synced_commits_across_a_cut() {
        let (_dir, mut volume) = mounted();
        let db = volume.path().join("test.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE t (n INTEGER);",
        )
        .unwrap();
        for n in 0..50 {
            conn.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
        }
        // Commits that are never fsynced: a power cut takes them.
        conn.execute_batch("PRAGMA synchronous = OFF").unwrap();
        for n in 50..80 {
            conn.execute("INSERT INTO t VALUES (?1)", [n]).unwrap();
        }
        let seen: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 80);
        // The power goes: nothing lands any more; the "process" dies while
        // closing (its checkpoint's writes wait, then fail).
        volume.freeze();
        let dying = std::thread::spawn(move || drop(conn));
        volume.power_cut().unwrap();
        dying.join().unwrap();
        let conn = rusqlite::Connection::open(&db).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let kept: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            kept, 50,
            "the synced commits survive, the unsynced ones are lost"
        );
    }
}
