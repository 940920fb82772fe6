//! Which rootfs paths changed since the last pass, from inotify.
//!
//! Every directory gets a watch before it is read, so a change made after
//! the read is reported. Events name the directory (by watch) and the
//! entry; both become dirty. A new directory is walked whole in the next
//! pass (entries may have been made in it before its watch was set). What
//! the tracker cannot follow (a directory renamed, so its watch names a
//! stale path; a queue overflow; a watch that cannot be added) makes the
//! next pass compare every entry instead ([`Changes::Everything`]).
//!
//! inotify rather than fanotify filesystem marks: it reports events per
//! directory with names, which is what a pass needs, without resolving file
//! handles, and it sees only the rootfs, not the whole filesystem under it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// What changed since the last drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Compare every entry (and set the watches again).
    Everything(String),
    /// These paths changed (or appeared, or went); these directories are
    /// new and must be walked whole.
    Paths { dirty: BTreeSet<PathBuf>, new_dirs: BTreeSet<PathBuf> },
}

pub struct Tracker {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    dirty: BTreeSet<PathBuf>,
    new_dirs: BTreeSet<PathBuf>,
    lost: Option<String>,
}

fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_DONT_FOLLOW
        | AddWatchFlags::IN_ONLYDIR
}

impl Tracker {
    pub fn new() -> Result<Self, String> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| format!("inotify: {e}"))?;
        Ok(Self { inotify, dirs: HashMap::new(), dirty: BTreeSet::new(), new_dirs: BTreeSet::new(), lost: None })
    }

    /// Watches directory `abs` (the rootfs's `rel`); call before reading it.
    pub fn watch(&mut self, abs: &Path, rel: &Path) {
        if self.lost.is_some() {
            return;
        }
        match self.inotify.add_watch(abs, watch_mask()) {
            Ok(wd) => {
                self.dirs.insert(wd, rel.to_path_buf());
            }
            // Gone already: its parent's event says so.
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
            Err(e) => self.lost = Some(format!("cannot watch {}: {e} (fs.inotify.max_user_watches?)", abs.display())),
        }
    }

    /// Number of directories watched.
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Reads the queued events and returns what changed since the last call.
    pub fn drain(&mut self) -> Changes {
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    for ev in events {
                        self.note(ev.wd, ev.mask, ev.name.as_deref().map(Path::new));
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.lost.get_or_insert(format!("reading inotify events: {e}"));
                    break;
                }
            }
        }
        let dirty = std::mem::take(&mut self.dirty);
        let new_dirs = std::mem::take(&mut self.new_dirs);
        match self.lost.take() {
            Some(why) => Changes::Everything(why),
            None => Changes::Paths { dirty, new_dirs },
        }
    }

    fn note(&mut self, wd: WatchDescriptor, mask: AddWatchFlags, name: Option<&Path>) {
        if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            self.lost.get_or_insert("the inotify queue overflowed".into());
            return;
        }
        if mask.contains(AddWatchFlags::IN_IGNORED) {
            self.dirs.remove(&wd);
            return;
        }
        let Some(dir) = self.dirs.get(&wd).cloned() else { return };
        if mask.contains(AddWatchFlags::IN_MOVE_SELF)
            || (mask.contains(AddWatchFlags::IN_ISDIR)
                && mask.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVED_TO))
        {
            self.lost.get_or_insert(format!("directory {} was renamed", dir.join(name.unwrap_or(Path::new(""))).display()));
            return;
        }
        match name {
            None => {
                self.dirty.insert(dir);
            }
            Some(name) => {
                let path = dir.join(name);
                if mask.contains(AddWatchFlags::IN_ISDIR) && mask.contains(AddWatchFlags::IN_CREATE) {
                    self.new_dirs.insert(path.clone());
                }
                // A name made or removed changes its directory's mtime.
                if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVED_TO) {
                    self.dirty.insert(dir);
                }
                self.dirty.insert(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(c: Changes) -> (Vec<String>, Vec<String>) {
        match c {
            Changes::Paths { dirty, new_dirs } => (
                dirty.iter().map(|p| p.display().to_string()).collect(),
                new_dirs.iter().map(|p| p.display().to_string()).collect(),
            ),
            Changes::Everything(why) => panic!("lost track: {why}"),
        }
    }

    #[test]
    fn writes_creations_and_deletions_are_reported_with_their_directory() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/a"), "1").unwrap();
        std::fs::write(root.path().join("etc/gone"), "1").unwrap();
        let mut t = Tracker::new().unwrap();
        t.watch(root.path(), Path::new(""));
        t.watch(&root.path().join("etc"), Path::new("etc"));
        assert_eq!(paths(t.drain()), (vec![], vec![]));

        std::fs::write(root.path().join("etc/a"), "2").unwrap();
        std::fs::remove_file(root.path().join("etc/gone")).unwrap();
        std::fs::create_dir(root.path().join("new")).unwrap();
        std::fs::write(root.path().join("new/inside"), "x").unwrap();
        let (dirty, new_dirs) = paths(t.drain());
        assert_eq!(dirty, vec!["", "etc", "etc/a", "etc/gone", "new"]);
        assert_eq!(new_dirs, vec!["new"]);
        assert_eq!(paths(t.drain()), (vec![], vec![]), "a drain empties the set");
    }

    #[test]
    fn a_renamed_directory_makes_the_next_pass_compare_everything() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        let mut t = Tracker::new().unwrap();
        t.watch(root.path(), Path::new(""));
        t.watch(&root.path().join("d"), Path::new("d"));
        std::fs::rename(root.path().join("d"), root.path().join("e")).unwrap();
        assert!(matches!(t.drain(), Changes::Everything(why) if why.contains("renamed")));
    }
}
