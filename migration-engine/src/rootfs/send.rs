//! The sender's passes over the rootfs.
//!
//! A regular file is opened before its record is made, and the record is
//! the opened file's: a file replaced in between is read as what it now is.
//! A file is read up to the size it had when opened; a write racing the
//! read moves its ctime and raises an inotify event, so the next pass sends
//! it again. The digest covers exactly the bytes sent (holes as zeros), so
//! the receiver can check what it wrote.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use migration_protocol::rootfs::{encode_file_data_prefix, DeleteRecord, EntryKind, EntryRecord, FileEnd, TreeRecord, ROOT_PATH};
use migration_protocol::{Compressor, FrameWriter, MessageKind, RootfsEnd, RootfsPhase};
use prost::Message;

use super::scan::{kind_of, read_xattrs, SentEntry, Snapshot, Stamp};
use super::tracker::{Changes, Tracker};
use super::{hex, CHUNK};
use crate::MigrationError;

/// What one pass sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub entries: u64,
    pub deleted: u64,
    /// File data bytes read and sent.
    pub file_bytes: u64,
    /// Why this pass compared every entry instead of following inotify
    /// (None: it followed inotify, or it was the initial pass).
    pub full_walk: Option<String>,
    /// Frozen pass: the tree digest (hex).
    pub tree_digest: Option<String>,
    pub tree_entries: u64,
}

/// The sender's side of the rootfs copy: the tree as sent so far, and the
/// watches that say what changed since.
pub struct TreeSender {
    root: PathBuf,
    pub snapshot: Snapshot,
    tracker: Option<Tracker>,
    /// Why there are no watches (None while they work).
    untracked: Option<String>,
}

/// Where a pass's frames go.
struct Emit<'a, W: Write> {
    out: &'a mut FrameWriter<W>,
    compressor: &'a mut Compressor,
    on_bytes: &'a mut dyn FnMut(u64),
    report: PassReport,
    /// Files sent in this pass, by inode: later names of one are hard links.
    sent_inodes: HashMap<(u64, u64), PathBuf>,
    /// The initial pass stops once in the middle of a file when the test
    /// failpoint `sender-rootfs-mid-file` says so.
    pause_mid_file: bool,
}

impl<W: Write> Emit<'_, W> {
    fn frame(&mut self, kind: MessageKind, payload: &[u8]) -> Result<(), MigrationError> {
        self.out.write_frame(kind, payload)?;
        Ok(())
    }
}

impl TreeSender {
    /// `hidden`: the container's mount points (see [`super::scan::hidden_mount_points`]).
    pub fn new(root: &Path, hidden: BTreeSet<PathBuf>) -> Self {
        let snapshot = Snapshot { hidden, ..Default::default() };
        Self { root: root.to_path_buf(), snapshot, tracker: None, untracked: None }
    }

    /// Bytes of the regular files the initial pass will send, from their
    /// metadata alone (for its progress' percent and time left): what the
    /// container's mounts cover is left out, as the pass leaves it out.
    pub fn estimated_bytes(&self) -> u64 {
        let mut walk = walkdir::WalkDir::new(&self.root).same_file_system(true).into_iter();
        let mut total = 0u64;
        while let Some(entry) = walk.next() {
            let Ok(entry) = entry else { continue };
            let rel = entry.path().strip_prefix(&self.root).unwrap_or(entry.path());
            if self.snapshot.hidden.contains(rel) {
                if entry.file_type().is_dir() {
                    walk.skip_current_dir();
                }
                continue;
            }
            if entry.file_type().is_file() {
                total += entry.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
        total
    }

    /// Sends every entry, setting a watch on each directory before reading it.
    pub fn initial_pass<W: Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        compressor: &mut Compressor,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<PassReport, MigrationError> {
        self.start_tracking();
        let mut em = Emit { out, compressor, on_bytes, report: PassReport::default(), sent_inodes: HashMap::new(), pause_mid_file: true };
        self.walk(&mut em, Path::new(""), false)?;
        self.finish(em, RootfsPhase::Initial)
    }

    /// Sends what changed since the last pass. `phase` is Delta while the
    /// container runs, Frozen for the last pass (which adds the digest).
    pub fn delta_pass<W: Write>(
        &mut self,
        out: &mut FrameWriter<W>,
        compressor: &mut Compressor,
        phase: RootfsPhase,
    ) -> Result<PassReport, MigrationError> {
        let mut nothing = |_| {};
        let mut em =
            Emit { out, compressor, on_bytes: &mut nothing, report: PassReport::default(), sent_inodes: HashMap::new(), pause_mid_file: false };
        let changes = match self.tracker.as_mut() {
            Some(t) => t.drain(),
            None => Changes::Everything(self.untracked.clone().unwrap_or_else(|| "no inotify watches".into())),
        };
        match changes {
            Changes::Everything(why) => {
                em.report.full_walk = Some(why);
                self.start_tracking();
                self.walk(&mut em, Path::new(""), true)?;
            }
            Changes::Paths { dirty, new_dirs } => self.send_changed(&mut em, dirty, new_dirs)?,
        }
        self.finish(em, phase)
    }

    /// Drops the watches: the next pass compares every entry, as when
    /// inotify cannot follow (and then sets the watches again).
    pub fn stop_tracking(&mut self, why: &str) {
        self.tracker = None;
        self.untracked = Some(why.to_string());
    }

    fn start_tracking(&mut self) {
        match Tracker::new() {
            Ok(t) => {
                self.tracker = Some(t);
                self.untracked = None;
            }
            Err(why) => {
                self.tracker = None;
                self.untracked = Some(why);
            }
        }
    }

    fn finish<W: Write>(&mut self, mut em: Emit<'_, W>, phase: RootfsPhase) -> Result<PassReport, MigrationError> {
        let mut end = RootfsEnd { phase, entries: em.report.entries, deleted: em.report.deleted, tree_entries: 0, tree_digest: String::new() };
        if phase == RootfsPhase::Frozen {
            if corrupt_at!("sender-rootfs-unsent-change") {
                // A change in the digest that no record carried.
                if let Some(e) = self.snapshot.entries.values_mut().find(|e| e.record.kind == EntryKind::File as u32) {
                    e.record.mode ^= 0o1;
                }
            }
            let (digest, n) = self.snapshot.tree_digest();
            end.tree_digest = hex(&digest);
            end.tree_entries = n;
            em.report.tree_digest = Some(end.tree_digest.clone());
            em.report.tree_entries = n;
        }
        em.out.write_json(MessageKind::RootfsEnd, &end)?;
        Ok(em.report)
    }

    /// Walks `start` (a directory) and below. `compare`: send only entries
    /// whose stamp differs from the snapshot's, and delete what is gone;
    /// otherwise send everything.
    fn walk<W: Write>(&mut self, em: &mut Emit<'_, W>, start: &Path, compare: bool) -> Result<(), MigrationError> {
        let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
        let top = self.root.join(start);
        let mut it = walkdir::WalkDir::new(&top).same_file_system(true).follow_links(false).sort_by_file_name().into_iter();
        while let Some(item) = it.next() {
            let item = match item {
                Ok(i) => i,
                // Vanished while walking: it is not in this pass.
                Err(e) if e.io_error().map(|io| io.kind()) == Some(std::io::ErrorKind::NotFound) => continue,
                Err(e) => return Err(MigrationError::Other(format!("walking {}: {e}", top.display()))),
            };
            let rel = item.path().strip_prefix(&self.root).expect("walkdir stays below its root").to_path_buf();
            if item.file_type().is_dir() {
                // Before walkdir reads it (on the next call).
                if let Some(t) = self.tracker.as_mut() {
                    t.watch(item.path(), &rel);
                }
                if self.snapshot.hidden.contains(&rel) {
                    it.skip_current_dir();
                }
            }
            if compare {
                seen.insert(rel.clone());
                if let (Some(old), Ok(meta)) = (self.snapshot.entries.get(&rel), item.metadata()) {
                    if old.stamp == Stamp::of(&meta) {
                        continue;
                    }
                }
            }
            self.send_entry(em, &rel)?;
        }
        if compare {
            let gone: Vec<PathBuf> = self
                .snapshot
                .entries
                .keys()
                .filter(|p| p.starts_with(start) && p.as_path() != start && !seen.contains(*p))
                .cloned()
                .collect();
            self.send_deletions(em, gone)?;
        }
        Ok(())
    }

    /// Deletes each path of `gone` (sorted) whose parent is not deleted too.
    fn send_deletions<W: Write>(&mut self, em: &mut Emit<'_, W>, gone: Vec<PathBuf>) -> Result<(), MigrationError> {
        let mut last: Option<PathBuf> = None;
        for p in gone {
            if last.as_ref().is_some_and(|l| p.starts_with(l)) {
                continue;
            }
            self.send_delete(em, &p)?;
            last = Some(p);
        }
        Ok(())
    }

    fn send_delete<W: Write>(&mut self, em: &mut Emit<'_, W>, rel: &Path) -> Result<(), MigrationError> {
        self.snapshot.remove_tree(rel);
        let rec = DeleteRecord { path: rel.as_os_str().as_bytes().to_vec() };
        em.frame(MessageKind::RootfsDelete, &rec.encode_to_vec())?;
        em.report.deleted += 1;
        Ok(())
    }

    /// Sends what inotify reported.
    fn send_changed<W: Write>(&mut self, em: &mut Emit<'_, W>, dirty: BTreeSet<PathBuf>, new_dirs: BTreeSet<PathBuf>) -> Result<(), MigrationError> {
        let mut walked: Vec<PathBuf> = Vec::new();
        for rel in dirty.iter().chain(new_dirs.iter()).collect::<BTreeSet<_>>() {
            if self.snapshot.is_hidden(rel) || (!rel.as_os_str().is_empty() && walked.iter().any(|w| rel.starts_with(w))) {
                continue;
            }
            let abs = self.root.join(rel);
            let meta = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                    if self.snapshot.entries.contains_key(rel) {
                        self.send_delete(em, rel)?;
                    }
                    continue;
                }
                Err(e) => return Err(MigrationError::io(format!("stat {}", abs.display()))(e)),
            };
            let was_dir = self.snapshot.entries.get(rel).map(|e| e.record.kind == EntryKind::Directory as u32);
            if was_dir == Some(true) && !meta.is_dir() {
                self.send_delete(em, rel)?;
            }
            if meta.is_dir() && (new_dirs.contains(rel) || was_dir != Some(true)) {
                // New: entries may have been made before its watch. The
                // walk sends the directory itself first.
                self.walk(em, rel, false)?;
                walked.push(rel.clone());
                continue;
            }
            if meta.is_file() && meta.nlink() > 1 {
                for name in self.names_of(rel, &meta) {
                    self.send_entry(em, &name)?;
                }
                continue;
            }
            self.send_entry(em, rel)?;
        }
        Ok(())
    }

    /// Every known name of `rel`'s file (the inode's other names must
    /// follow its new content), `rel` included, in path order.
    fn names_of(&self, rel: &Path, meta: &std::fs::Metadata) -> BTreeSet<PathBuf> {
        let key = (meta.dev(), meta.ino());
        let mut names: BTreeSet<PathBuf> = self.snapshot.links.get(&key).cloned().unwrap_or_default();
        if (names.len() as u64) < meta.nlink() {
            // A name added since: the others had one link then.
            names.extend(
                self.snapshot.entries.iter().filter(|(_, e)| (e.stamp.dev, e.stamp.ino) == key).map(|(p, _)| p.clone()),
            );
        }
        names.insert(rel.to_path_buf());
        names
    }

    /// Sends one entry as it is now; an entry that vanished is skipped (the
    /// next pass deletes it).
    fn send_entry<W: Write>(&mut self, em: &mut Emit<'_, W>, rel: &Path) -> Result<(), MigrationError> {
        let abs = self.root.join(rel);
        let vanished = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP));
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if vanished(&e) => return Ok(()),
            Err(e) => return Err(MigrationError::io(format!("stat {}", abs.display()))(e)),
        };
        if meta.file_type().is_socket() {
            // Made again by the process that owns it; what was sent at
            // this path before goes.
            if self.snapshot.entries.contains_key(rel) {
                self.send_delete(em, rel)?;
            }
            return Ok(());
        }
        let (file, meta) = if meta.is_file() {
            match open_for_reading(&abs) {
                Ok(f) => {
                    let m = f.metadata().map_err(MigrationError::io(format!("stat {}", abs.display())))?;
                    (Some(f), m)
                }
                Err(e) if vanished(&e) => return Ok(()),
                Err(e) => return Err(MigrationError::io(format!("opening {}", abs.display()))(e)),
            }
        } else {
            (None, meta)
        };
        let kind = kind_of(&abs, &meta)?;
        let stamp = Stamp::of(&meta);
        let key = (meta.dev(), meta.ino());
        let path_bytes = if rel.as_os_str().is_empty() { ROOT_PATH.to_vec() } else { rel.as_os_str().as_bytes().to_vec() };
        if let (Some(_), Some(leader)) = (&file, em.sent_inodes.get(&key).cloned()) {
            let record = EntryRecord {
                path: path_bytes,
                kind: EntryKind::HardLink as u32,
                target: leader.as_os_str().as_bytes().to_vec(),
                ..Default::default()
            };
            em.frame(MessageKind::RootfsEntry, &record.encode_to_vec())?;
            let tree = self.snapshot.entries.get(&leader).map(|e| e.record.clone()).unwrap_or_default();
            self.snapshot.insert(rel.to_path_buf(), SentEntry { stamp, record: tree });
            em.report.entries += 1;
            return Ok(());
        }
        let target = if kind == EntryKind::Symlink {
            match std::fs::read_link(&abs) {
                Ok(t) => t.as_os_str().as_bytes().to_vec(),
                Err(e) if vanished(&e) => return Ok(()),
                Err(e) => return Err(MigrationError::io(format!("reading symlink {}", abs.display()))(e)),
            }
        } else {
            Vec::new()
        };
        let xattrs = read_xattrs(&abs)?;
        let rdev = meta.rdev();
        let record = EntryRecord {
            path: path_bytes,
            kind: kind as u32,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec() as u32,
            atime_sec: meta.atime(),
            atime_nsec: meta.atime_nsec() as u32,
            rdev_major: if kind == EntryKind::CharDevice { nix::sys::stat::major(rdev) as u32 } else { 0 },
            rdev_minor: if kind == EntryKind::CharDevice { nix::sys::stat::minor(rdev) as u32 } else { 0 },
            target,
            xattrs,
        };
        em.frame(MessageKind::RootfsEntry, &record.encode_to_vec())?;
        let (size, digest) = match &file {
            Some(f) => {
                let (size, digest) = send_content(em, f, meta.size())?;
                em.frame(MessageKind::RootfsFileEnd, &FileEnd { size, digest: digest.clone() }.encode_to_vec())?;
                em.sent_inodes.insert(key, rel.to_path_buf());
                (size, digest)
            }
            None => (0, Vec::new()),
        };
        let tree = tree_record_of(&record, size, digest);
        if self.snapshot.entries.get(rel).is_some_and(|e| e.record.kind == EntryKind::Directory as u32) && kind != EntryKind::Directory {
            self.snapshot.remove_tree(rel);
        }
        self.snapshot.insert(rel.to_path_buf(), SentEntry { stamp, record: tree });
        em.report.entries += 1;
        Ok(())
    }
}

/// The tree digest's record of an entry as sent.
pub fn tree_record_of(e: &EntryRecord, size: u64, digest: Vec<u8>) -> TreeRecord {
    let kind = e.kind();
    TreeRecord {
        kind: e.kind,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: match kind {
            Some(EntryKind::File) => size,
            Some(EntryKind::Symlink) => e.target.len() as u64,
            _ => 0,
        },
        mtime_sec: e.mtime_sec,
        mtime_nsec: e.mtime_nsec,
        rdev_major: e.rdev_major,
        rdev_minor: e.rdev_minor,
        target: if kind == Some(EntryKind::Symlink) { e.target.clone() } else { Vec::new() },
        digest,
        xattrs: e.xattrs.clone(),
        leader: Vec::new(),
    }
}

fn open_for_reading(abs: &Path) -> std::io::Result<File> {
    let open = |flags| std::fs::OpenOptions::new().read(true).custom_flags(flags).open(abs);
    // O_NOATIME keeps the copy from touching access times; it needs the
    // file's owner or CAP_FOWNER.
    match open(libc::O_NOFOLLOW | libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(libc::O_NOFOLLOW),
        other => other,
    }
}

/// Feeds `n` zero bytes to a digest (a hole, or a file's zero tail).
pub fn digest_zeros(ctx: &mut ring::digest::Context, mut n: u64) {
    static ZEROS: [u8; 65536] = [0; 65536];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        ctx.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Sends the file's bytes up to `size_at_open`, skipping holes; returns the
/// size the receiver must give it and the digest of its bytes.
fn send_content<W: Write>(em: &mut Emit<'_, W>, f: &File, size_at_open: u64) -> Result<(u64, Vec<u8>), MigrationError> {
    use std::os::fd::AsRawFd;
    let meta = f.metadata().map_err(MigrationError::io("stat of an open file"))?;
    let sparse = meta.blocks() * 512 < size_at_open;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut hashed = 0u64;
    let mut next = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(8 + CHUNK);
    while next < size_at_open {
        let start = if sparse {
            match nix::unistd::lseek(f.as_raw_fd(), next as i64, nix::unistd::Whence::SeekData) {
                Ok(s) => s as u64,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(e) => return Err(MigrationError::Other(format!("finding the data of a sparse file: {e}"))),
            }
        } else {
            next
        };
        if start >= size_at_open {
            break;
        }
        // Up to the next hole: its zeros are not sent.
        let data_end = if sparse {
            nix::unistd::lseek(f.as_raw_fd(), start as i64, nix::unistd::Whence::SeekHole).map(|h| h as u64).unwrap_or(size_at_open)
        } else {
            size_at_open
        };
        let want = ((data_end.min(size_at_open).max(start + 1) - start) as usize).min(CHUNK);
        encode_file_data_prefix(start, &mut buf);
        buf.resize(8 + want, 0);
        let n = read_at_fully(f, &mut buf[8..], start).map_err(MigrationError::io("reading a rootfs file"))?;
        if n == 0 {
            break; // shrunk while read
        }
        buf.truncate(8 + n);
        digest_zeros(&mut ctx, start - hashed);
        ctx.update(&buf[8..]);
        hashed = start + n as u64;
        next = hashed;
        em.compressor.write(em.out, MessageKind::RootfsFileData, &buf)?;
        em.report.file_bytes += n as u64;
        (em.on_bytes)(n as u64);
        if hashed < size_at_open && std::mem::take(&mut em.pause_mid_file) {
            em.out.flush()?;
            failpoint!("sender-rootfs-mid-file")?;
        }
    }
    // A file that grew is sent again by the next pass; one that shrank ends
    // where its data ended. A sparse file keeps its trailing hole.
    let size = if sparse {
        let now = f.metadata().map_err(MigrationError::io("stat of an open file"))?.len();
        hashed.max(size_at_open.min(now))
    } else {
        hashed
    };
    digest_zeros(&mut ctx, size - hashed);
    Ok((size, ctx.finish().as_ref().to_vec()))
}

fn read_at_fully(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
