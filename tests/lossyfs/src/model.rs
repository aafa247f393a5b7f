//! What the file system holds, in memory, twice: the state every caller sees
//! and the state that would survive a power cut.
//!
//! Why two states and these rules: a disk keeps only what was flushed to it.
//! `fsync`/`fdatasync` of a file makes its bytes and its size durable;
//! an entry of a directory (a create, unlink, rename or mkdir) becomes
//! durable only when that directory is fsynced. This is stricter than LazyFS
//! (which makes entries durable at once) on purpose: a program that forgets a
//! directory fsync loses the file here, as it may on ext4 or XFS. A file that
//! was fsynced in a directory that was not is gone after a cut; a directory
//! fsync of a file never fsynced keeps its name with its durable (maybe
//! empty) contents.
//!
//! [`Model::cut`] is the power cut: every inode goes back to its durable
//! state, and whatever is no longer reachable from the root is forgotten.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

/// The root directory's inode number (FUSE's).
pub(crate) const ROOT: u64 = 1;

/// An errno value.
pub(crate) type Errno = i32;

/// Files and directories only: what the relay and SQLite create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
}

/// One inode, with its current and its durable state.
pub(crate) struct Node {
    pub kind: Kind,
    pub perm: u16,
    pub mtime: SystemTime,
    /// A file's bytes as callers see them.
    pub data: Vec<u8>,
    /// A file's bytes as of its last fsync.
    durable_data: Vec<u8>,
    /// The smallest range covering every write since the last fsync.
    dirty: Option<(usize, usize)>,
    /// The shortest the file was since the last fsync: from there on its
    /// bytes may differ from the durable ones.
    shortest: usize,
    /// A directory's entries as callers see them.
    pub entries: BTreeMap<OsString, u64>,
    /// A directory's entries as of its last fsync.
    durable_entries: BTreeMap<OsString, u64>,
    /// Open handles: an unlinked file stays readable while open.
    pub open: u32,
}

impl Node {
    fn new(kind: Kind, perm: u16) -> Node {
        Node {
            kind,
            perm,
            mtime: SystemTime::now(),
            data: Vec::new(),
            durable_data: Vec::new(),
            dirty: None,
            shortest: 0,
            entries: BTreeMap::new(),
            durable_entries: BTreeMap::new(),
            open: 0,
        }
    }

    /// Makes the current state durable.
    fn sync(&mut self) {
        match self.kind {
            Kind::Dir => self.durable_entries = self.entries.clone(),
            Kind::File => {
                let len = self.data.len();
                let (dirty_start, dirty_end) = self.dirty.unwrap_or((len, 0));
                let start = dirty_start.min(self.shortest);
                let end = if self.shortest < len {
                    len
                } else {
                    dirty_end.min(len)
                };
                self.durable_data.resize(len, 0);
                if start < end {
                    self.durable_data[start..end].copy_from_slice(&self.data[start..end]);
                }
                self.dirty = None;
                self.shortest = len;
            }
        }
    }

    /// Goes back to the durable state.
    fn revert(&mut self) {
        self.data.clone_from(&self.durable_data);
        self.entries.clone_from(&self.durable_entries);
        self.dirty = None;
        self.shortest = self.data.len();
        self.open = 0;
    }
}

/// Where the power stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Power {
    On,
    /// The power is going: requests wait (see the FUSE side) until it is off.
    Frozen,
    /// Every change fails (EIO), nothing more becomes durable, until
    /// [`Model::cut`].
    Off,
}

/// Every inode, and the power.
pub(crate) struct Model {
    nodes: HashMap<u64, Node>,
    next: u64,
    pub power: Power,
}

impl Model {
    /// An empty file system whose root is durable.
    pub fn new() -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(Kind::Dir, 0o755));
        Model {
            nodes,
            next: ROOT + 1,
            power: Power::On,
        }
    }

    /// The power cut and the power back: every unsynced byte, size change
    /// and entry is lost.
    pub fn cut(&mut self) {
        for node in self.nodes.values_mut() {
            node.revert();
        }
        self.collect();
        self.power = Power::On;
    }

    pub fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        if self.power != Power::On {
            return Err(libc::EIO);
        }
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        let node = self.node_mut(ino)?;
        match node.kind {
            Kind::Dir => Ok(node),
            Kind::File => Err(libc::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        let node = self.node_mut(ino)?;
        match node.kind {
            Kind::File => Ok(node),
            Kind::Dir => Err(libc::EISDIR),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.node(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(libc::ENOENT)
    }

    /// A new file or directory named `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        perm: u16,
    ) -> Result<u64, Errno> {
        let ino = self.next;
        let dir = self.dir_mut(parent)?;
        if dir.entries.contains_key(name) {
            return Err(libc::EEXIST);
        }
        dir.entries.insert(name.to_owned(), ino);
        dir.mtime = SystemTime::now();
        self.nodes.insert(ino, Node::new(kind, perm));
        self.next += 1;
        Ok(ino)
    }

    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<usize, Errno> {
        let node = self.file_mut(ino)?;
        let start = usize::try_from(offset).map_err(|_| libc::EFBIG)?;
        let end = start + bytes.len();
        if node.data.len() < end {
            node.data.resize(end, 0);
        }
        node.data[start..end].copy_from_slice(bytes);
        node.dirty = Some(match node.dirty {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
        node.mtime = SystemTime::now();
        Ok(bytes.len())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        let data = &self.node(ino)?.data;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Ok(&data[start..end])
    }

    /// Truncates or extends (with zeros) a file.
    pub fn set_len(&mut self, ino: u64, len: u64) -> Result<(), Errno> {
        let node = self.file_mut(ino)?;
        let len = usize::try_from(len).map_err(|_| libc::EFBIG)?;
        node.data.resize(len, 0);
        node.shortest = node.shortest.min(len);
        node.mtime = SystemTime::now();
        Ok(())
    }

    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<(), Errno> {
        self.node_mut(ino)?.perm = perm;
        Ok(())
    }

    /// Removes a file's (`dir == false`) or an empty directory's entry.
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let node = self.node(ino)?;
        match (node.kind, dir) {
            (Kind::Dir, false) => return Err(libc::EISDIR),
            (Kind::File, true) => return Err(libc::ENOTDIR),
            (Kind::Dir, true) if !node.entries.is_empty() => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        let parent = self.dir_mut(parent)?;
        parent.entries.remove(name);
        parent.mtime = SystemTime::now();
        self.collect();
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        if let Ok(existing) = self.lookup(new_parent, new_name) {
            if no_replace {
                return Err(libc::EEXIST);
            }
            let (moved, replaced) = (self.node(ino)?, self.node(existing)?);
            match (moved.kind, replaced.kind) {
                (Kind::File, Kind::Dir) => return Err(libc::EISDIR),
                (Kind::Dir, Kind::File) => return Err(libc::ENOTDIR),
                (Kind::Dir, Kind::Dir) if !replaced.entries.is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                _ => {}
            }
        }
        self.dir_mut(new_parent)?;
        let from = self.dir_mut(parent)?;
        from.entries.remove(name);
        from.mtime = SystemTime::now();
        let to = self.dir_mut(new_parent)?;
        to.entries.insert(new_name.to_owned(), ino);
        to.mtime = SystemTime::now();
        self.collect();
        Ok(())
    }

    /// `fsync`, `fdatasync` (a file) or `fsyncdir` (a directory).
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        self.node_mut(ino)?.sync();
        self.collect();
        Ok(())
    }

    pub fn opened(&mut self, ino: u64) -> Result<(), Errno> {
        self.nodes.get_mut(&ino).ok_or(libc::ENOENT)?.open += 1;
        Ok(())
    }

    pub fn released(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open = node.open.saturating_sub(1);
            self.collect();
        }
    }

    /// Forgets the inodes that no entry (current or durable) reaches and
    /// no handle holds: an unlinked segment's 8 MiB must not pile up.
    fn collect(&mut self) {
        let mut reachable = HashSet::from([ROOT]);
        let mut todo = vec![ROOT];
        todo.extend(
            self.nodes
                .iter()
                .filter(|(_, node)| node.open > 0)
                .map(|(ino, _)| *ino),
        );
        reachable.extend(todo.iter().copied());
        while let Some(ino) = todo.pop() {
            let Some(node) = self.nodes.get(&ino) else {
                continue;
            };
            for child in node.entries.values().chain(node.durable_entries.values()) {
                if reachable.insert(*child) {
                    todo.push(*child);
                }
            }
        }
        self.nodes.retain(|ino, _| reachable.contains(ino));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(model: &mut Model, name: &str) -> u64 {
        model
            .create(ROOT, OsStr::new(name), Kind::File, 0o644)
            .unwrap()
    }

    #[test]
    fn a_shrink_then_regrow_is_synced_whole() {
        let mut model = Model::new();
        let ino = file(&mut model, "f");
        model.write(ino, 0, b"0123456789").unwrap();
        model.sync(ino).unwrap();
        model.sync(ROOT).unwrap();
        model.set_len(ino, 2).unwrap();
        model.write(ino, 8, b"ab").unwrap();
        model.sync(ino).unwrap();
        model.cut();
        assert_eq!(model.read(ino, 0, 100).unwrap(), b"01\0\0\0\0\0\0ab");
    }

    #[test]
    fn an_unlinked_open_file_lives_until_released() {
        let mut model = Model::new();
        let ino = file(&mut model, "f");
        model.opened(ino).unwrap();
        model.remove(ROOT, OsStr::new("f"), false).unwrap();
        model.write(ino, 0, b"x").unwrap();
        model.released(ino);
        assert!(model.node(ino).is_err(), "collected once closed");
    }

    #[test]
    fn a_model_without_power_refuses_changes_until_the_cut() {
        let mut model = Model::new();
        let ino = file(&mut model, "f");
        model.power = Power::Off;
        assert_eq!(model.write(ino, 0, b"x"), Err(libc::EIO));
        assert_eq!(model.sync(ROOT), Err(libc::EIO));
        model.cut();
        assert_eq!(model.lookup(ROOT, OsStr::new("f")), Err(libc::ENOENT));
        assert!(model
            .create(ROOT, OsStr::new("g"), Kind::File, 0o644)
            .is_ok());
    }
}
