//! The FUSE side: each kernel request becomes one call on the shared
//! [`Model`](crate::model::Model).
//!
//! Why it is enough for the relay and SQLite: without the writeback cache
//! (fuser does not ask for it) every `write` reaches the model at once, so
//! the model sees every byte before any fsync of it; a shared mmap (SQLite's
//! `-shm`) is written back by the kernel through the same `write`. POSIX and
//! BSD locks are left to the kernel (fuser does not ask for FUSE's lock
//! requests), which is right for one machine. Attributes are cached for a
//! short while only; a remount after a cut drops every kernel cache.

use std::ffi::OsStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Kind, Model, Node, Power};

/// How long the kernel may trust an answer about names and attributes.
const TTL: Duration = Duration::from_millis(100);
/// What `statfs` reports as free: the relay writes journal segments out
/// beforehand only when the disk has room (a few 8 MiB segments).
const FREE_BLOCKS: u64 = 1 << 20;
const BLOCK: u32 = 4096;

/// The model and a way to wake the requests waiting for the power.
pub(crate) struct Shared {
    pub model: Mutex<Model>,
    pub power_changed: Condvar,
}

impl Shared {
    /// Locks the model, whatever a panicking holder left behind.
    pub fn lock(&self) -> MutexGuard<'_, Model> {
        self.model
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the power and wakes whoever waits for it.
    pub fn set_power(&self, power: Power) {
        self.lock().power = power;
        self.power_changed.notify_all();
    }
}

/// The FUSE file system over a shared model.
pub(crate) struct LossyFs {
    pub shared: Arc<Shared>,
    /// Owner of every file: whoever mounted it.
    pub uid: u32,
    pub gid: u32,
}

impl LossyFs {
    /// The model, once the power is not going: a request that comes while
    /// it is frozen waits (a disk that stopped answering) and then fails,
    /// so no write lands after the cut and the program gets no answer in
    /// between to act on.
    fn model(&self) -> MutexGuard<'_, Model> {
        let mut model = self.shared.lock();
        while model.power == Power::Frozen {
            model = self
                .shared
                .power_changed
                .wait(model)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        model
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, size, nlink) = match node.kind {
            Kind::File => (FileType::RegularFile, node.data.len() as u64, 1),
            Kind::Dir => (FileType::Directory, 0, 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    /// The attributes of `ino`, for an entry or attribute reply.
    fn attr_of(&self, model: &Model, ino: u64) -> Result<FileAttr, Errno> {
        model
            .node(ino)
            .map(|node| self.attr(ino, node))
            .map_err(Errno::from_i32)
    }

    fn new_entry(
        &self,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        umask: u32,
    ) -> Result<(u64, FileAttr), Errno> {
        let mut model = self.model();
        let perm = (mode & !umask & 0o7777) as u16;
        let ino = model
            .create(parent.0, name, kind, perm)
            .map_err(Errno::from_i32)?;
        Ok((ino, self.attr_of(&model, ino)?))
    }
}

fn empty(reply: ReplyEmpty, result: Result<(), i32>) {
    match result {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(Errno::from_i32(errno)),
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let model = self.model();
        match model
            .lookup(parent.0, name)
            .map_err(Errno::from_i32)
            .and_then(|ino| self.attr_of(&model, ino))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(&self.model(), ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut model = self.model();
        let changed = size
            .map_or(Ok(()), |len| model.set_len(ino.0, len))
            .and_then(|()| {
                mode.map_or(Ok(()), |mode| model.set_perm(ino.0, (mode & 0o7777) as u16))
            });
        match changed
            .map_err(Errno::from_i32)
            .and_then(|()| self.attr_of(&model, ino.0))
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.new_entry(parent, name, Kind::Dir, mode, umask) {
            Ok((_, attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.model().remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.model().remove(parent.0, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        empty(
            reply,
            self.model()
                .rename(parent.0, name, newparent.0, newname, no_replace),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model().opened(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let created = self
            .new_entry(parent, name, Kind::File, mode, umask)
            .and_then(|(ino, attr)| {
                self.model().opened(ino).map_err(Errno::from_i32)?;
                Ok(attr)
            });
        match created {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().read(ino.0, offset, size) {
            Ok(bytes) => reply.data(bytes),
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().write(ino.0, offset, data) {
            Ok(written) => reply.written(written as u32),
            Err(errno) => reply.error(Errno::from_i32(errno)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // A close is no sync: nothing becomes durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model().released(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.model().sync(ino.0));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let model = self.model();
        let node = match model.node(ino.0) {
            Ok(node) if node.kind == Kind::Dir => node,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(errno) => return reply.error(Errno::from_i32(errno)),
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (ino.0, FileType::Directory, OsStr::new("..")),
        ];
        let children = node.entries.iter().map(|(name, child)| {
            let kind = match model.node(*child).map(|n| n.kind) {
                Ok(Kind::Dir) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            (*child, kind, name.as_os_str())
        });
        for (index, (child, kind, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.model().sync(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(
            FREE_BLOCKS,
            FREE_BLOCKS,
            FREE_BLOCKS,
            1 << 20,
            1 << 20,
            BLOCK,
            255,
            BLOCK,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // Plain allocation only (posix_fallocate): it may grow the file.
        if mode != 0 {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let mut model = self.model();
        let len = model.node(ino.0).map(|node| node.data.len() as u64);
        let grown = len.and_then(|len| {
            let end = offset.saturating_add(length);
            if end > len {
                model.set_len(ino.0, end)
            } else {
                Ok(())
            }
        });
        empty(reply, grown);
    }
}
