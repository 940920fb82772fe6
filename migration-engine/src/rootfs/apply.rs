//! The receiver's side: applying rootfs records to the staged tree.
//!
//! Every record is checked on decoding (migration_protocol::rootfs). Paths
//! are reached through directory descriptors opened one component at a
//! time with O_NOFOLLOW, and every operation names its entry as
//! `/proc/self/fd/<parent>/<name>`: a symlink the stream made earlier can
//! never redirect a later write out of the rootfs. What was applied is
//! kept ([`Applier::expected`], the digest of each file written) for the
//! verification before restore ([`super::verify`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use migration_protocol::rootfs::{decode_file_data, DeleteRecord, EntryKind, EntryRecord, FileEnd, TreeRecord};
use migration_protocol::{Frame, FrameReader, MessageKind, ProtocolError, RootfsEnd};
use nix::sys::stat::{utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::scan::tree_record;
use super::send::{digest_zeros, tree_record_of};
use super::verify::differs;
use super::hex;
use crate::MigrationError;

/// What the receiver allows beyond the fixed rules.
#[derive(Debug, Clone, Default)]
pub struct UnpackPolicy {
    /// Clear setuid and setgid bits (`receive --strip-setuid`).
    pub strip_setuid: bool,
}

impl UnpackPolicy {
    pub fn mode(&self, mode: u32) -> u32 {
        if self.strip_setuid {
            mode & !0o6000
        } else {
            mode
        }
    }
}

/// A file being written: its record, and the digest of what arrived.
struct OpenFile {
    rel: PathBuf,
    file: File,
    record: EntryRecord,
    digest: ring::digest::Context,
    /// End of the data written so far.
    end: u64,
}

/// Applies rootfs passes to `root`, remembering what the tree should be.
pub struct Applier {
    root: PathBuf,
    root_dir: File,
    pub policy: UnpackPolicy,
    /// The tree as the records describe it.
    pub(crate) expected: BTreeMap<PathBuf, TreeRecord>,
    /// Which file (by the order it was written) each name is: hard links
    /// share one.
    pub(crate) file_ids: HashMap<PathBuf, u64>,
    next_id: u64,
    /// Digest and file id of each file written here, by inode.
    pub(crate) written: HashMap<(u64, u64), (Vec<u8>, u64)>,
    /// Directories whose times are set again when the pass ends (made or
    /// removed names moved them).
    touched_dirs: BTreeSet<PathBuf>,
    open: Option<OpenFile>,
    parent_cache: Option<(PathBuf, File)>,
}

fn bad(kind: MessageKind, reason: String) -> MigrationError {
    MigrationError::Protocol(ProtocolError::Malformed { kind, reason })
}

impl Applier {
    pub fn new(root: &Path, policy: UnpackPolicy) -> Result<Self, MigrationError> {
        let root_dir = open_dir_path(root).map_err(MigrationError::io(format!("opening {}", root.display())))?;
        Ok(Self {
            root: root.to_path_buf(),
            root_dir,
            policy,
            expected: BTreeMap::new(),
            file_ids: HashMap::new(),
            next_id: 0,
            written: HashMap::new(),
            touched_dirs: BTreeSet::new(),
            open: None,
            parent_cache: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }


    /// Applies one pass, starting with `first` (already read), up to its
    /// RootfsEnd. Returns it and the payload bytes read.
    pub fn receive_pass<R: Read>(&mut self, input: &mut FrameReader<R>, first: Frame) -> Result<(RootfsEnd, u64), MigrationError> {
        let mut frame = first;
        let mut bytes = 0u64;
        loop {
            bytes += frame.payload.len() as u64;
            match frame.kind {
                MessageKind::RootfsEntry => {
                    self.expect_no_open_file(MessageKind::RootfsEntry)?;
                    let record = EntryRecord::decode_checked(&frame.payload)?;
                    self.apply_entry(record)?;
                }
                MessageKind::RootfsFileData => self.file_data(&frame.payload)?,
                MessageKind::RootfsFileEnd => self.file_end(&frame.payload)?,
                MessageKind::RootfsDelete => {
                    self.expect_no_open_file(MessageKind::RootfsDelete)?;
                    let d = DeleteRecord::decode_checked(&frame.payload)?;
                    self.delete(Path::new(std::ffi::OsStr::from_bytes(&d.path)))?;
                }
                MessageKind::RootfsEnd => {
                    self.expect_no_open_file(MessageKind::RootfsEnd)?;
                    let end: RootfsEnd = frame.json()?;
                    self.set_dir_times()?;
                    return Ok((end, bytes));
                }
                MessageKind::Abort => {
                    let a: migration_protocol::Abort = frame.json()?;
                    return Err(MigrationError::Aborted(a.reason));
                }
                other => {
                    return Err(ProtocolError::UnexpectedMessage { expected: "a rootfs record", got: other }.into());
                }
            }
            frame = input.read_frame()?;
        }
    }

    fn expect_no_open_file(&self, kind: MessageKind) -> Result<(), MigrationError> {
        match &self.open {
            Some(f) => Err(bad(kind, format!("arrived before the end of file {}", f.rel.display()))),
            None => Ok(()),
        }
    }

    /// The directory holding `rel`, and `rel`'s name in it.
    fn parent(&mut self, rel: &Path) -> Result<(PathBuf, OsString), MigrationError> {
        let name = rel.file_name().expect("checked paths have a name").to_os_string();
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if self.parent_cache.as_ref().map(|(p, _)| p) != Some(&parent) {
            let mut dir = self.root_dir.try_clone().map_err(MigrationError::io("duplicating the rootfs descriptor"))?;
            for c in parent.components() {
                dir = open_dir_path(&fd_path(&dir, c.as_os_str())).map_err(|e| {
                    MigrationError::BadStream(format!(
                        "refusing rootfs entry {}: its parent {} is not a directory inside the rootfs ({e})",
                        rel.display(),
                        parent.display()
                    ))
                })?;
            }
            self.parent_cache = Some((parent, dir));
        }
        let (_, dir) = self.parent_cache.as_ref().expect("just set");
        Ok((fd_path(dir, &name), name))
    }

    /// Removes whatever is at `at` (a path from [`Self::parent`]).
    fn remove_at(&mut self, at: &Path) -> Result<(), MigrationError> {
        match std::fs::symlink_metadata(at) {
            Ok(m) if m.is_dir() => {
                // The cached parent may lie below it.
                self.parent_cache = None;
                std::fs::remove_dir_all(at)
            }
            Ok(_) => std::fs::remove_file(at),
            Err(_) => Ok(()),
        }
        .map_err(MigrationError::io(format!("removing {}", at.display())))
    }

    /// `rel`'s directory's mtime moved: it is set again, and checked, at
    /// the end of the pass.
    fn touch_parent(&mut self, rel: &Path) {
        if let Some(p) = rel.parent() {
            self.touched_dirs.insert(p.to_path_buf());
        }
    }

    fn forget_tree(&mut self, rel: &Path) {
        let below: Vec<PathBuf> =
            self.expected.range(rel.to_path_buf()..).take_while(|(p, _)| p.starts_with(rel)).map(|(p, _)| p.clone()).collect();
        for p in below {
            self.expected.remove(&p);
            self.file_ids.remove(&p);
            self.touched_dirs.remove(&p);
        }
    }

    fn apply_entry(&mut self, e: EntryRecord) -> Result<(), MigrationError> {
        let rel = e.path().to_path_buf();
        let kind = e.kind().expect("checked on decoding");
        if e.is_root() {
            let at = self.root.clone();
            let ctx = |what: &str| MigrationError::io(format!("{what} the rootfs directory"));
            std::os::unix::fs::lchown(&at, Some(e.uid), Some(e.gid)).map_err(ctx("setting the owner of"))?;
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(self.policy.mode(e.mode))).map_err(ctx("setting the mode of"))?;
            set_xattrs_at(&at, &e, true).map_err(ctx("setting extended attributes of"))?;
            self.touched_dirs.insert(rel.clone());
            self.expected.insert(rel, tree_record_of(&e, 0, Vec::new()));
            return Ok(());
        }
        let (at, _) = self.parent(&rel)?;
        let existing = std::fs::symlink_metadata(&at).ok();
        let ctx = |what: &str| MigrationError::io(format!("{what} {}", rel.display()));
        self.touch_parent(&rel);
        match kind {
            EntryKind::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    self.remove_at(&at)?;
                    self.forget_tree(&rel);
                    std::fs::create_dir(&at).map_err(ctx("creating directory"))?;
                }
            }
            EntryKind::File => {
                self.remove_at(&at)?;
                self.forget_tree(&rel);
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&at)
                    .map_err(ctx("creating"))?;
                let digest = ring::digest::Context::new(&ring::digest::SHA256);
                self.open = Some(OpenFile { rel, file, record: e, digest, end: 0 });
                return Ok(());
            }
            EntryKind::HardLink => {
                let target = e.target_path().to_path_buf();
                let id = match (self.expected.get(&target), self.file_ids.get(&target)) {
                    (Some(r), Some(id)) if r.kind == EntryKind::File as u32 => *id,
                    _ => {
                        return Err(bad(
                            MessageKind::RootfsEntry,
                            format!("hard link {} names {}, which is not a file received earlier", rel.display(), target.display()),
                        ))
                    }
                };
                if target == rel {
                    return Err(bad(MessageKind::RootfsEntry, format!("hard link {} names itself", rel.display())));
                }
                self.remove_at(&at)?;
                self.forget_tree(&rel);
                let (target_at, _) = self.parent(&target)?;
                // Keeps the target's directory open while the link's own
                // directory takes the cache (target_at names it by fd).
                let _target_dir = self.parent_cache.take();
                let (at, _) = self.parent(&rel)?;
                std::fs::hard_link(&target_at, &at).map_err(ctx("linking"))?;
                let record = self.expected[&target].clone();
                self.expected.insert(rel.clone(), record);
                self.file_ids.insert(rel.clone(), id);
                return self.check_on_disk(&rel);
            }
            EntryKind::Symlink => {
                self.remove_at(&at)?;
                self.forget_tree(&rel);
                std::os::unix::fs::symlink(e.target_path(), &at).map_err(ctx("creating symlink"))?;
            }
            EntryKind::Fifo | EntryKind::CharDevice => {
                self.remove_at(&at)?;
                self.forget_tree(&rel);
                let (kind, dev) = if kind == EntryKind::Fifo {
                    (SFlag::S_IFIFO, 0)
                } else {
                    (SFlag::S_IFCHR, nix::sys::stat::makedev(e.rdev_major as u64, e.rdev_minor as u64))
                };
                nix::sys::stat::mknod(&at, kind, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|err| MigrationError::Other(format!("creating {} {}: {err}", kind_name(kind), rel.display())))?;
            }
        }
        // Owner first: chown clears setuid and setgid bits.
        std::os::unix::fs::lchown(&at, Some(e.uid), Some(e.gid)).map_err(ctx("setting the owner of"))?;
        if kind != EntryKind::Symlink {
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(self.policy.mode(e.mode))).map_err(ctx("setting the mode of"))?;
        }
        set_xattrs_at(&at, &e, kind == EntryKind::Directory).map_err(ctx("setting extended attributes of"))?;
        if kind == EntryKind::Directory {
            self.touched_dirs.insert(rel.clone());
        } else {
            set_times(&at, &e, UtimensatFlags::NoFollowSymlink).map_err(|err| MigrationError::Other(format!("setting the times of {}: {err}", rel.display())))?;
        }
        self.expected.insert(rel.clone(), tree_record_of(&e, 0, Vec::new()));
        self.file_ids.remove(&rel);
        // A directory is checked once its times are set, at the pass's end.
        if kind == EntryKind::Directory {
            Ok(())
        } else {
            self.check_on_disk(&rel)
        }
    }

    fn file_data(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let Some(f) = self.open.as_mut() else {
            return Err(bad(MessageKind::RootfsFileData, "file data outside a file".into()));
        };
        let (offset, data) = decode_file_data(payload)?;
        if offset < f.end || offset.checked_add(data.len() as u64).is_none() {
            return Err(bad(MessageKind::RootfsFileData, format!("data for {} out of order", f.rel.display())));
        }
        digest_zeros(&mut f.digest, offset - f.end);
        f.digest.update(data);
        f.file.write_all_at(data, offset).map_err(MigrationError::io(format!("writing {}", f.rel.display())))?;
        f.end = offset + data.len() as u64;
        Ok(())
    }

    fn file_end(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let Some(mut f) = self.open.take() else {
            return Err(bad(MessageKind::RootfsFileEnd, "file end outside a file".into()));
        };
        let end = FileEnd::decode_checked(payload)?;
        if end.size < f.end {
            return Err(bad(MessageKind::RootfsFileEnd, format!("{} ends at {} but data reached {}", f.rel.display(), end.size, f.end)));
        }
        digest_zeros(&mut f.digest, end.size - f.end);
        let digest = f.digest.finish().as_ref().to_vec();
        if digest != end.digest {
            return Err(MigrationError::RootfsMismatch(format!(
                "rootfs file {} arrived damaged: its bytes hash to {}, the source's to {}",
                f.rel.display(),
                hex(&digest),
                hex(&end.digest)
            )));
        }
        let ctx = |what: &str| MigrationError::io(format!("{what} {}", f.rel.display()));
        f.file.set_len(end.size).map_err(ctx("sizing"))?;
        std::os::unix::fs::fchown(&f.file, Some(f.record.uid), Some(f.record.gid)).map_err(ctx("setting the owner of"))?;
        f.file.set_permissions(std::fs::Permissions::from_mode(self.policy.mode(f.record.mode))).map_err(ctx("setting the mode of"))?;
        for x in &f.record.xattrs {
            xattr::FileExt::set_xattr(&f.file, std::ffi::OsStr::from_bytes(&x.name), &x.value).map_err(ctx("setting extended attributes of"))?;
        }
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", f.file.as_raw_fd()));
        set_times(&by_fd, &f.record, UtimensatFlags::FollowSymlink)
            .map_err(|err| MigrationError::Other(format!("setting the times of {}: {err}", f.rel.display())))?;
        let meta = f.file.metadata().map_err(ctx("stat"))?;
        self.next_id += 1;
        self.written.insert((meta.dev(), meta.ino()), (digest.clone(), self.next_id));
        self.file_ids.insert(f.rel.clone(), self.next_id);
        self.expected.insert(f.rel.clone(), tree_record_of(&f.record, end.size, digest));
        drop(f.file);
        self.check_on_disk(&f.rel)
    }

    fn delete(&mut self, rel: &Path) -> Result<(), MigrationError> {
        let (at, _) = self.parent(rel)?;
        self.remove_at(&at)?;
        self.forget_tree(rel);
        self.touch_parent(rel);
        self.check_on_disk(rel)
    }

    /// Directory times, once their entries are made.
    fn set_dir_times(&mut self) -> Result<(), MigrationError> {
        for dir in std::mem::take(&mut self.touched_dirs) {
            let Some(rec) = self.expected.get(&dir).cloned() else { continue };
            let at = if dir.as_os_str().is_empty() { self.root.clone() } else { self.parent(&dir)?.0 };
            let ts = |s: i64, ns: u32| TimeSpec::new(s, ns as i64);
            utimensat(None, &at, &ts(rec.mtime_sec, rec.mtime_nsec), &ts(rec.mtime_sec, rec.mtime_nsec), UtimensatFlags::NoFollowSymlink)
                .map_err(|e| MigrationError::Other(format!("setting the times of {}: {e}", dir.display())))?;
            self.check_on_disk(&dir)?;
        }
        Ok(())
    }

    /// Compares what is at `rel` on disk now with its record (absent if it
    /// has none). A file must be the one this receiver wrote for that
    /// record (by inode); its content was hashed as it was written.
    pub(crate) fn check_on_disk(&mut self, rel: &Path) -> Result<(), MigrationError> {
        let at = if rel.as_os_str().is_empty() { self.root.clone() } else { self.parent(rel)?.0 };
        let meta = match std::fs::symlink_metadata(&at) {
            Ok(m) => Some(m),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => None,
            Err(e) => return Err(differs(rel, format!("cannot stat it: {e}"))),
        };
        let (want, meta) = match (self.expected.get(rel), meta) {
            (None, None) => return Ok(()),
            (Some(_), None) => return Err(differs(rel, "missing on the destination".into())),
            (None, Some(_)) => return Err(differs(rel, "on the destination but not on the source".into())),
            (Some(w), Some(m)) => (w, m),
        };
        let mut want = want.clone();
        want.mode = self.policy.mode(want.mode);
        let written = self.written.get(&(meta.dev(), meta.ino()));
        let digest = match written {
            Some((digest, id)) if meta.is_file() && self.file_ids.get(rel) == Some(id) => digest.clone(),
            Some(_) if meta.is_file() => return Err(differs(rel, "hard links (the name holds another file)".into())),
            None if meta.is_file() => return Err(differs(rel, "content (not a file this receiver wrote from the stream)".into())),
            _ => Vec::new(),
        };
        let got = tree_record(&at, &meta, meta.size(), digest).map_err(|e| differs(rel, e.to_string()))?;
        if got != want {
            return Err(differs(rel, want.difference(&got)));
        }
        Ok(())
    }
}

fn kind_name(kind: SFlag) -> &'static str {
    if kind == SFlag::S_IFIFO {
        "fifo"
    } else {
        "device"
    }
}

/// `/proc/self/fd/<dir>/<name>`: `name` inside the directory open as `dir`.
fn fd_path(dir: &File, name: &std::ffi::OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(name);
    p
}

/// A directory opened for use as a parent only; fails on a symlink.
fn open_dir_path(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

fn set_times(at: &Path, e: &EntryRecord, flags: UtimensatFlags) -> nix::Result<()> {
    utimensat(
        None,
        at,
        &TimeSpec::new(e.atime_sec, e.atime_nsec as i64),
        &TimeSpec::new(e.mtime_sec, e.mtime_nsec as i64),
        flags,
    )
}

/// Makes the entry's extended attributes exactly the record's (a kept
/// directory may have others from an earlier pass).
fn set_xattrs_at(at: &Path, e: &EntryRecord, may_have_others: bool) -> std::io::Result<()> {
    if may_have_others {
        for name in xattr::list(at)? {
            let keep = e.xattrs.iter().any(|x| x.name == name.as_bytes());
            if !keep {
                xattr::remove(at, &name)?;
            }
        }
    }
    for x in &e.xattrs {
        xattr::set(at, std::ffi::OsStr::from_bytes(&x.name), &x.value)?;
    }
    Ok(())
}
