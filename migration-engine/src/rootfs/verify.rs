//! Proof, before the restore, that the destination's rootfs is the
//! source's frozen rootfs.
//!
//! Two checks, both from what is on this host:
//! 1. the records received add up to the sender's tree digest (nothing
//!    lost, added or changed on the way);
//! 2. the tree on disk, walked afresh, equals those records: every path,
//!    type, mode, owner, size, mtime, link target, device number, extended
//!    attribute and hard link, and each file is the file whose bytes were
//!    hashed as they were written.
//!
//! The walk reads no file contents: a file's digest is the one computed as
//! its bytes were written, found by its inode, so a file this receiver did
//! not write (or wrote from other records) has none and fails the check.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use migration_protocol::rootfs::{assign_leaders, EntryKind, TreeRecord};
use migration_protocol::RootfsEnd;

use super::apply::{Applier, UnpackPolicy};
use super::hex;
use super::scan::{digest_tree, tree_record};
use crate::MigrationError;

/// What a verification needs, taken from the applier once the frozen pass
/// is in (so that it can run in a thread while the images arrive).
pub struct Expected {
    root: PathBuf,
    policy: UnpackPolicy,
    tree: BTreeMap<PathBuf, TreeRecord>,
    file_ids: HashMap<PathBuf, u64>,
    written: HashMap<(u64, u64), Vec<u8>>,
    end: RootfsEnd,
}

/// A verified tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub digest: String,
    pub entries: u64,
    /// How long the verification took.
    pub took: std::time::Duration,
}

impl Expected {
    pub fn take(applier: &mut Applier, end: RootfsEnd) -> Self {
        Self {
            root: applier.root().to_path_buf(),
            policy: applier.policy.clone(),
            tree: std::mem::take(&mut applier.expected),
            file_ids: std::mem::take(&mut applier.file_ids),
            written: std::mem::take(&mut applier.written),
            end,
        }
    }

    pub fn verify(mut self) -> Result<Verified, MigrationError> {
        let started = std::time::Instant::now();
        let keys: Vec<(PathBuf, u64)> = self.file_ids.iter().map(|(p, id)| (p.clone(), *id)).collect();
        assign_leaders(&mut self.tree, &keys);
        let digest = hex(&digest_tree(&self.tree));
        if digest != self.end.tree_digest || self.tree.len() as u64 != self.end.tree_entries {
            return Err(MigrationError::RootfsMismatch(format!(
                "the rootfs records received do not add up to the source's tree: {} entries with digest {digest}, the source has {} with {}",
                self.tree.len(),
                self.end.tree_entries,
                self.end.tree_digest
            )));
        }
        let actual = walk(&self.root, &self.written)?;
        for (path, want) in &self.tree {
            let mut want = want.clone();
            want.mode = self.policy.mode(want.mode);
            match actual.get(path) {
                None => return Err(differs(path, "missing on the destination".into())),
                Some(got) if *got != want => return Err(differs(path, want.difference(got))),
                Some(_) => {}
            }
        }
        if let Some(extra) = actual.keys().find(|p| !self.tree.contains_key(*p)) {
            return Err(differs(extra, "on the destination but not on the source".into()));
        }
        Ok(Verified { digest, entries: self.tree.len() as u64, took: started.elapsed() })
    }
}

fn differs(path: &Path, what: String) -> MigrationError {
    MigrationError::RootfsMismatch(format!("the destination's rootfs differs from the source's at /{}: {what}", path.display()))
}

/// The tree at `root` as the digest sees it.
fn walk(root: &Path, written: &HashMap<(u64, u64), Vec<u8>>) -> Result<BTreeMap<PathBuf, TreeRecord>, MigrationError> {
    let mut tree = BTreeMap::new();
    let mut keys = Vec::new();
    for item in walkdir::WalkDir::new(root).same_file_system(true).follow_links(false).sort_by_file_name() {
        let item = item.map_err(|e| MigrationError::Other(format!("walking {}: {e}", root.display())))?;
        let rel = item.path().strip_prefix(root).expect("below the root").to_path_buf();
        let meta = item.metadata().map_err(|e| MigrationError::Other(format!("stat {}: {e}", item.path().display())))?;
        if meta.file_type().is_socket() {
            continue;
        }
        let key = (meta.dev(), meta.ino());
        let digest = if meta.is_file() { written.get(&key).cloned().unwrap_or_default() } else { Vec::new() };
        let record = tree_record(item.path(), &meta, meta.size(), digest).map_err(|e| MigrationError::Other(format!("checking the rootfs: {e}")))?;
        if record.kind == EntryKind::File as u32 {
            keys.push((rel.clone(), key));
        }
        tree.insert(rel, record);
    }
    assign_leaders(&mut tree, &keys);
    Ok(tree)
}
