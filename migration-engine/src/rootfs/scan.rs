//! What the sender knows of the tree: every entry it sent, with the stamp
//! it had and the record the tree digest covers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use container_runtime::procinfo;
use migration_protocol::rootfs::{digest_input_of, xattr_name_allowed, EntryKind, TreeRecord, Xattr};

use crate::MigrationError;

/// What identifies an entry's state cheaply: a write or a metadata change
/// moves its ctime (and a replacement its inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub mode: u32,
    pub nlink: u64,
}

impl Stamp {
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            mode: m.mode(),
            nlink: m.nlink(),
        }
    }
}

/// One entry as sent.
#[derive(Debug, Clone)]
pub struct SentEntry {
    pub stamp: Stamp,
    pub record: TreeRecord,
}

/// The sender's view of the destination's tree after the passes so far.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub(crate) entries: BTreeMap<PathBuf, SentEntry>,
    /// Names of files with more than one link, by inode.
    pub(crate) links: HashMap<(u64, u64), BTreeSet<PathBuf>>,
    /// Mount points of the container, relative: their contents are hidden.
    pub(crate) hidden: BTreeSet<PathBuf>,
}

impl Snapshot {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn insert(&mut self, path: PathBuf, entry: SentEntry) {
        self.forget_links(&path);
        if entry.record.kind == EntryKind::File as u32 && entry.stamp.nlink > 1 {
            self.links.entry((entry.stamp.dev, entry.stamp.ino)).or_default().insert(path.clone());
        }
        self.entries.insert(path, entry);
    }

    fn forget_links(&mut self, path: &Path) {
        if let Some(old) = self.entries.get(path) {
            let key = (old.stamp.dev, old.stamp.ino);
            if let Some(names) = self.links.get_mut(&key) {
                names.remove(path);
                if names.is_empty() {
                    self.links.remove(&key);
                }
            }
        }
    }

    /// Removes `path` and everything below it; returns whether anything was
    /// there.
    pub(crate) fn remove_tree(&mut self, path: &Path) -> bool {
        let below: Vec<PathBuf> = self.entries.range(path.to_path_buf()..).take_while(|(p, _)| p.starts_with(path)).map(|(p, _)| p.clone()).collect();
        for p in &below {
            self.forget_links(p);
            self.entries.remove(p);
        }
        !below.is_empty()
    }

    /// Whether `path` lies inside a mount point's hidden contents.
    pub(crate) fn is_hidden(&self, path: &Path) -> bool {
        path.ancestors().skip(1).any(|a| self.hidden.contains(a))
    }

    /// The tree digest and its entry count (see migration_protocol::rootfs).
    /// Computed while frozen: no copy of the tree, one buffer for all.
    pub fn tree_digest(&self) -> (Vec<u8>, u64) {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = Vec::with_capacity(4096);
        for (path, e) in &self.entries {
            buf.clear();
            let leader = self.links.get(&(e.stamp.dev, e.stamp.ino)).filter(|names| names.len() > 1 && names.contains(path)).and_then(|n| n.first());
            match leader {
                Some(leader) => {
                    let mut record = e.record.clone();
                    record.leader = leader.as_os_str().as_bytes().to_vec();
                    digest_input_of(&mut buf, path, &record);
                }
                None => digest_input_of(&mut buf, path, &e.record),
            }
            ctx.update(&buf);
        }
        (ctx.finish().as_ref().to_vec(), self.entries.len() as u64)
    }
}

/// SHA-256 over a tree's digest input.
pub fn digest_tree(tree: &BTreeMap<PathBuf, TreeRecord>) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = Vec::with_capacity(4096);
    for (path, record) in tree {
        buf.clear();
        digest_input_of(&mut buf, path, record);
        ctx.update(&buf);
    }
    ctx.finish().as_ref().to_vec()
}

/// What the tree digest records for an entry, from its metadata; `digest`
/// is the content digest of a regular file.
pub fn tree_record(abs: &Path, meta: &std::fs::Metadata, size: u64, digest: Vec<u8>) -> Result<TreeRecord, MigrationError> {
    let kind = kind_of(abs, meta)?;
    let ft = meta.file_type();
    let rdev = meta.rdev();
    let (rdev_major, rdev_minor) =
        if ft.is_char_device() { (nix::sys::stat::major(rdev) as u32, nix::sys::stat::minor(rdev) as u32) } else { (0, 0) };
    let target = if ft.is_symlink() {
        std::fs::read_link(abs).map_err(MigrationError::io(format!("reading symlink {}", abs.display())))?.as_os_str().as_bytes().to_vec()
    } else {
        Vec::new()
    };
    Ok(TreeRecord {
        kind: kind as u32,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: match kind {
            EntryKind::File => size,
            EntryKind::Symlink => target.len() as u64,
            _ => 0,
        },
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec() as u32,
        rdev_major,
        rdev_minor,
        target,
        digest,
        xattrs: read_xattrs(abs)?,
        leader: Vec::new(),
    })
}

/// The entry kind of `meta`, or an error naming what cannot be carried.
pub fn kind_of(abs: &Path, meta: &std::fs::Metadata) -> Result<EntryKind, MigrationError> {
    let ft = meta.file_type();
    Ok(if ft.is_dir() {
        EntryKind::Directory
    } else if ft.is_file() {
        EntryKind::File
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else if ft.is_char_device() {
        let rdev = meta.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev) as u32, nix::sys::stat::minor(rdev) as u32);
        if !migration_protocol::rootfs::device_allowed(major, minor) {
            return Err(device_refused(abs, "character", major, minor));
        }
        EntryKind::CharDevice
    } else if ft.is_block_device() {
        let rdev = meta.rdev();
        return Err(device_refused(abs, "block", nix::sys::stat::major(rdev) as u32, nix::sys::stat::minor(rdev) as u32));
    } else {
        return Err(MigrationError::Preflight(format!("{} is of a file type ctmigrate cannot copy", abs.display())));
    })
}

fn device_refused(abs: &Path, what: &str, major: u32, minor: u32) -> MigrationError {
    let allowed: Vec<&str> = migration_protocol::rootfs::ALLOWED_DEVICES.iter().map(|d| d.2).collect();
    MigrationError::Preflight(format!(
        "the rootfs holds {what} device {} ({major}:{minor}) outside the container's mounts: ctmigrate recreates only the standard devices ({}); remove it from the rootfs or give it to the container through config.json's linux.devices",
        abs.display(),
        allowed.join(", ")
    ))
}

/// An entry's extended attributes, sorted by name; an error names one that
/// ctmigrate cannot carry.
pub fn read_xattrs(abs: &Path) -> Result<Vec<Xattr>, MigrationError> {
    let names = match xattr::list(abs) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(MigrationError::io(format!("listing extended attributes of {}", abs.display()))(e)),
    };
    let mut out = Vec::new();
    for name in names {
        let bytes = name.as_bytes().to_vec();
        if !xattr_name_allowed(&bytes) {
            return Err(MigrationError::Preflight(format!(
                "{} carries extended attribute {}, which ctmigrate cannot carry (it carries user.*, trusted.*, security.* and POSIX ACLs)",
                abs.display(),
                name.to_string_lossy()
            )));
        }
        match xattr::get(abs, &name) {
            Ok(Some(value)) => out.push(Xattr { name: bytes, value }),
            Ok(None) => {}
            Err(e) => return Err(MigrationError::io(format!("reading extended attribute {} of {}", name.to_string_lossy(), abs.display()))(e)),
        }
    }
    out.sort();
    Ok(out)
}

/// The container's mount points below its root, relative (its root's own
/// mount excluded): what lies under them in the rootfs directory is hidden
/// from the container and is not sent.
pub fn hidden_mount_points(pid: i32) -> Result<BTreeSet<PathBuf>, MigrationError> {
    let mounts = procinfo::mountinfo(pid).map_err(MigrationError::io(format!("reading /proc/{pid}/mountinfo")))?;
    Ok(mount_points_below_root(&mounts))
}

fn mount_points_below_root(mounts: &procinfo::MountInfos) -> BTreeSet<PathBuf> {
    procinfo::mount_points_below(mounts, Path::new("/"))
        .into_iter()
        .filter_map(|p| p.strip_prefix("/").ok().map(Path::to_path_buf))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_below_the_root_are_hidden() {
        let text = "\
22 1 8:1 / / rw - ext4 /dev/vda rw
23 22 0:5 / /dev rw - tmpfs tmpfs rw
24 23 0:6 / /dev/pts rw - devpts devpts rw
25 22 0:7 / /my\\040data rw - tmpfs tmpfs rw
";
        let hidden = mount_points_below_root(&<procinfo::MountInfos as procinfo::FromBufRead>::from_buf_read(text.as_bytes()).unwrap());
        let want: BTreeSet<PathBuf> = ["dev", "dev/pts", "my data"].iter().map(PathBuf::from).collect();
        assert_eq!(hidden, want);
        let snap = Snapshot { hidden, ..Default::default() };
        assert!(snap.is_hidden(Path::new("dev/console")));
        assert!(!snap.is_hidden(Path::new("dev")));
        assert!(!snap.is_hidden(Path::new("devices")));
    }

    #[test]
    fn removing_a_tree_forgets_its_links() {
        let mut snap = Snapshot::default();
        let file = |ino| SentEntry {
            stamp: Stamp { dev: 1, ino, size: 0, mtime_ns: 0, ctime_ns: 0, mode: 0o100644, nlink: 2 },
            record: TreeRecord { kind: EntryKind::File as u32, ..Default::default() },
        };
        snap.insert("a/x".into(), file(5));
        snap.insert("b".into(), file(5));
        snap.insert("ab".into(), file(6));
        assert_eq!(snap.links[&(1, 5)].len(), 2);
        assert!(snap.remove_tree(Path::new("a")));
        assert_eq!(snap.links[&(1, 5)].len(), 1);
        assert!(snap.entries.contains_key(Path::new("ab")), "a sibling with a longer name is not below a");
    }
}
