//! A small tmpfs for a disk that fills up.

use std::path::Path;

/// A small tmpfs mounted on a fresh temporary directory, for a disk that
/// fills up; unmounted when dropped, also when the test panics. Mounting needs
/// root (the tests run as root in CI); without it the test fails saying so.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `2m`).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match output {
            Ok(output) if output.status.success() => Tmpfs { dir },
            Ok(output) => panic!(
                "this test needs root to mount a tmpfs (mount -t tmpfs -o size={size} tmpfs {}): {} {}",
                dir.path().display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => panic!("this test needs root and the `mount` command to mount a tmpfs: {err}"),
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` until the file system refuses more (ENOSPC), so that any
    /// write that needs one more block fails; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join(name)).expect("create filler");
        let block = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        let mut chunk = block.len();
        // Large writes first, then smaller ones down to one byte, so the last
        // partial page is used up too.
        while chunk > 0 {
            match file.write(&block[..chunk]) {
                Ok(0) => chunk /= 2,
                Ok(n) => written += n as u64,
                Err(err) if err.raw_os_error() == Some(28) => chunk /= 2, // ENOSPC
                Err(err) => panic!("filling {name}: {err}"),
            }
        }
        file.sync_all().expect("sync filler");
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.dir.path().to_owned();
        let unmounted = std::process::Command::new("umount")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process holding a file): detach it now, freed when released.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&path)
                .status();
        }
    }
}
