//! Proof, before the restore, that the destination's rootfs is the
//! source's frozen rootfs.
//!
//! Two checks, both from what is on this host:
//! 1. the records received add up to the sender's tree digest (nothing
//!    lost, added or changed on the way);
//! 2. the tree on disk equals those records: every path, type, mode,
//!    owner, size, mtime, link target, device number, extended attribute
//!    and hard link, and each file is the file whose bytes were hashed as
//!    they were written (found by inode: no file content is read again).
//!
//! Walking the whole tree takes a good part of a second on a Debian rootfs,
//! too long for the frozen window, so check 2 is done in two parts
//! ([`Verifier`]): a walk of the whole tree in a thread after a pass made
//! while the container runs ([`Baseline`]), and, once the frozen pass is
//! in, a look at only the paths changed since that walk's snapshot. The
//! walk runs while later records are still applied, so a difference it
//! finds is held against it only at a path that no later record touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use migration_protocol::rootfs::{assign_leaders, EntryKind, TreeRecord};
use migration_protocol::RootfsEnd;

use super::apply::{Applier, UnpackPolicy};
use super::hex;
use super::scan::{digest_tree, tree_record};
use crate::MigrationError;

/// The applier's state at one moment, for a check in another thread.
#[derive(Clone)]
pub struct Expected {
    root: PathBuf,
    policy: UnpackPolicy,
    tree: BTreeMap<PathBuf, TreeRecord>,
    file_ids: HashMap<PathBuf, u64>,
    /// Content digest and file id of each file written, by inode.
    written: HashMap<(u64, u64), (Vec<u8>, u64)>,
}

/// A verified tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub digest: String,
    pub entries: u64,
    /// How long the frozen part of the verification took.
    pub took: std::time::Duration,
}

/// A whole-tree walk in a thread: the paths at which the disk differed
/// from the snapshot it was given, each with what differed.
type Baseline = JoinHandle<Result<BTreeMap<PathBuf, String>, MigrationError>>;

/// The receiver's verification across passes.
#[derive(Default)]
pub struct Verifier {
    baseline: Option<Baseline>,
}

impl Verifier {
    /// After a pass made while the container runs: starts a walk of the
    /// whole tree against what the applier holds now, unless one is still
    /// running (then the paths changed since its snapshot keep adding up).
    pub fn after_running_pass(&mut self, applier: &mut Applier) -> Result<(), MigrationError> {
        if self.baseline.as_ref().is_some_and(|b| !b.is_finished()) {
            return Ok(());
        }
        if let Some(done) = self.baseline.take() {
            let differences = done.join().map_err(|_| MigrationError::Other("the rootfs check thread panicked".into()))??;
            // Differences at paths changed since will be looked at again;
            // others are final.
            let changed = applier.changed_since_snapshot();
            if let Some((path, what)) = differences.iter().find(|(p, _)| !changed.contains(*p)) {
                return Err(differs(path, what.clone()));
            }
        }
        let snapshot = Expected::capture(applier);
        applier.clear_changed();
        self.baseline = Some(std::thread::spawn(move || snapshot.walk_and_compare()));
        Ok(())
    }

    /// After the frozen pass: the checks that remain, in a thread (the
    /// images arrive meanwhile); join it before restoring.
    pub fn finish(mut self, applier: &mut Applier, end: RootfsEnd) -> JoinHandle<Result<Verified, MigrationError>> {
        let expected = Expected::capture(applier);
        let changed = applier.clear_changed();
        let baseline = self.baseline.take();
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let with_leaders = expected.with_leaders();
            let (digest, entries) = digest_matches(&with_leaders, &end)?;
            let mut to_check = changed;
            match baseline {
                Some(b) => {
                    let differences = b.join().map_err(|_| MigrationError::Other("the rootfs check thread panicked".into()))??;
                    to_check.extend(differences.into_keys());
                }
                // No walk ran before: check every path.
                None => to_check.extend(expected.tree.keys().cloned()),
            }
            expected.check_paths(&to_check, &with_leaders)?;
            Ok(Verified { digest, entries, took: started.elapsed() })
        })
    }
}

impl Expected {
    fn capture(applier: &Applier) -> Self {
        Self {
            root: applier.root().to_path_buf(),
            policy: applier.policy.clone(),
            tree: applier.expected.clone(),
            file_ids: applier.file_ids.clone(),
            written: applier.written.clone(),
        }
    }

    /// The records, each file's first name among its hard links filled in.
    fn with_leaders(&self) -> BTreeMap<PathBuf, TreeRecord> {
        let mut tree = self.tree.clone();
        let keys: Vec<(PathBuf, u64)> = self.file_ids.iter().map(|(p, id)| (p.clone(), *id)).collect();
        assign_leaders(&mut tree, &keys);
        tree
    }

    /// What the records say `path` is, as the disk should show it.
    fn want(&self, path: &Path, leaders: &BTreeMap<PathBuf, TreeRecord>) -> Option<TreeRecord> {
        let mut want = leaders.get(path)?.clone();
        want.mode = self.policy.mode(want.mode);
        Some(want)
    }

    /// Walks the whole tree; returns where it differs from the records.
    fn walk_and_compare(self) -> Result<BTreeMap<PathBuf, String>, MigrationError> {
        let want = self.with_leaders();
        let (actual, unreadable) = walk(&self.root, &self.written);
        let mut differences: BTreeMap<PathBuf, String> = unreadable;
        for path in want.keys() {
            let Some(want) = self.want(path, &want) else { continue };
            match actual.get(path) {
                None => {
                    differences.entry(path.clone()).or_insert_with(|| "missing on the destination".into());
                }
                Some(got) if *got != want => {
                    differences.insert(path.clone(), want.difference(got));
                }
                Some(_) => {}
            }
        }
        for extra in actual.keys().filter(|p| !want.contains_key(*p)) {
            differences.insert(extra.clone(), "on the destination but not on the source".into());
        }
        Ok(differences)
    }

    /// Compares each of `paths` on disk with the records (absent where the
    /// records have nothing).
    fn check_paths(&self, paths: &BTreeSet<PathBuf>, leaders: &BTreeMap<PathBuf, TreeRecord>) -> Result<(), MigrationError> {
        // How many names each file has in the records: its link count.
        let mut names: HashMap<u64, u64> = HashMap::new();
        for id in self.file_ids.values() {
            *names.entry(*id).or_default() += 1;
        }
        for path in paths {
            let abs = self.root.join(path);
            let meta = match std::fs::symlink_metadata(&abs) {
                Ok(m) if !m.file_type().is_socket() => Some(m),
                Ok(_) => None,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => None,
                Err(e) => return Err(differs(path, format!("cannot stat it: {e}"))),
            };
            let want = self.want(path, leaders);
            let (want, meta) = match (want, meta) {
                (None, None) => continue,
                (Some(_), None) => return Err(differs(path, "missing on the destination".into())),
                (None, Some(_)) => return Err(differs(path, "on the destination but not on the source".into())),
                (Some(w), Some(m)) => (w, m),
            };
            let written = self.written.get(&(meta.dev(), meta.ino()));
            let digest = if meta.is_file() { written.map(|(d, _)| d.clone()).unwrap_or_default() } else { Vec::new() };
            let mut got = tree_record(&abs, &meta, meta.size(), digest).map_err(|e| differs(path, e.to_string()))?;
            if meta.is_file() {
                // Hard links: this name is the file written for its id, and
                // that file has as many names as the records give it.
                let id = self.file_ids.get(path);
                let count = id.and_then(|i| names.get(i)).copied().unwrap_or(0);
                match written {
                    None => return Err(differs(path, "content (not a file this receiver wrote from the stream)".into())),
                    Some((_, w)) if Some(w) != id => return Err(differs(path, "hard links (the name holds another file)".into())),
                    Some(_) if meta.nlink() != count => {
                        return Err(differs(path, format!("hard links (the file has {} names, the records give it {count})", meta.nlink())))
                    }
                    Some(_) => {}
                }
                got.leader = want.leader.clone();
            }
            if got != want {
                return Err(differs(path, want.difference(&got)));
            }
        }
        Ok(())
    }
}

/// The records (with leaders) add up to the sender's digest; returns it
/// and the count.
fn digest_matches(tree: &BTreeMap<PathBuf, TreeRecord>, end: &RootfsEnd) -> Result<(String, u64), MigrationError> {
    let digest = hex(&digest_tree(tree));
    if digest != end.tree_digest || tree.len() as u64 != end.tree_entries {
        return Err(MigrationError::RootfsMismatch(format!(
            "the rootfs records received do not add up to the source's tree: {} entries with digest {digest}, the source has {} with {}",
            tree.len(),
            end.tree_entries,
            end.tree_digest
        )));
    }
    Ok((digest, tree.len() as u64))
}

fn differs(path: &Path, what: String) -> MigrationError {
    MigrationError::RootfsMismatch(format!("the destination's rootfs differs from the source's at /{}: {what}", path.display()))
}

/// The tree at `root` as the digest sees it, and the paths that could not
/// be read (a walk running while records are still applied may find an
/// entry gone).
fn walk(root: &Path, written: &HashMap<(u64, u64), (Vec<u8>, u64)>) -> (BTreeMap<PathBuf, TreeRecord>, BTreeMap<PathBuf, String>) {
    let mut tree = BTreeMap::new();
    let mut unreadable = BTreeMap::new();
    let mut keys = Vec::new();
    let rel_of = |p: &Path| p.strip_prefix(root).unwrap_or(p).to_path_buf();
    for item in walkdir::WalkDir::new(root).same_file_system(true).follow_links(false).sort_by_file_name() {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                let path = e.path().map(rel_of).unwrap_or_default();
                unreadable.insert(path, format!("unreadable: {e}"));
                continue;
            }
        };
        let rel = rel_of(item.path());
        let record = item.metadata().map_err(|e| e.to_string()).and_then(|meta| {
            if meta.file_type().is_socket() {
                return Ok(None);
            }
            let key = (meta.dev(), meta.ino());
            let digest = if meta.is_file() { written.get(&key).map(|(d, _)| d.clone()).unwrap_or_default() } else { Vec::new() };
            let record = tree_record(item.path(), &meta, meta.size(), digest).map_err(|e| e.to_string())?;
            Ok(Some((record, key)))
        });
        match record {
            Ok(None) => {}
            Ok(Some((record, key))) => {
                if record.kind == EntryKind::File as u32 {
                    keys.push((rel.clone(), key));
                }
                tree.insert(rel, record);
            }
            Err(e) => {
                unreadable.insert(rel, format!("unreadable: {e}"));
            }
        }
    }
    assign_leaders(&mut tree, &keys);
    (tree, unreadable)
}
