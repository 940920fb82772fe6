//! Proof, before the restore, that the destination's rootfs is the
//! source's frozen rootfs.
//!
//! 1. Each record is checked on disk as soon as it is applied
//!    ([`Applier::check_on_disk`]): type, mode, owner, size, link target,
//!    device number, extended attributes, and for a file that it is the
//!    very file whose bytes were hashed as they were written (by inode:
//!    no content is read again); a directory once its times are set at the
//!    end of the pass, a deleted path by its absence. The receiver makes
//!    nothing but what records say, so the tree is the records.
//! 2. Once the frozen pass is in ([`start`], in a thread while the images
//!    arrive): the records add up to the sender's tree digest (nothing
//!    lost, added or changed on the way), and every file with several names
//!    has exactly those names (its link count, and each name is that file).
//!
//! A walk of the whole tree would prove the same, but takes a good part of
//! a second on a Debian rootfs (measured: 286-414 ms for 15 684 entries),
//! which the frozen window cannot afford; the checks above cost a stat per
//! entry applied, most of them while the container still runs.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use migration_protocol::rootfs::{assign_leaders, TreeRecord};
use migration_protocol::RootfsEnd;

use super::apply::Applier;
use super::hex;
use super::scan::digest_tree;
use crate::MigrationError;

/// A verified tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub digest: String,
    pub entries: u64,
    /// How long the checks after the frozen pass took.
    pub took: std::time::Duration,
}

/// After the frozen pass: the checks that remain, in a thread; join it
/// before restoring. The applier's records move into the thread (no
/// record comes after the frozen pass).
pub fn start(applier: &mut Applier, end: RootfsEnd) -> JoinHandle<Result<Verified, MigrationError>> {
    let root = applier.root().to_path_buf();
    let mut tree = std::mem::take(&mut applier.expected);
    let file_ids = std::mem::take(&mut applier.file_ids);
    let written = std::mem::take(&mut applier.written);
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let written: HashMap<(u64, u64), u64> = written.into_iter().map(|(k, (_, id))| (k, id)).collect();
        let keys: Vec<(PathBuf, u64)> = file_ids.iter().map(|(p, id)| (p.clone(), *id)).collect();
        assign_leaders(&mut tree, &keys);
        let (digest, entries) = digest_matches(&tree, &end)?;
        check_hard_links(&root, &file_ids, &written)?;
        Ok(Verified { digest, entries, took: started.elapsed() })
    })
}

/// The records add up to the sender's digest; returns it and the count.
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

/// Every name of a file with several is that file, and the file has no
/// other names. (A file's names can change after it was checked: a later
/// hard link adds one.)
fn check_hard_links(root: &Path, file_ids: &HashMap<PathBuf, u64>, written: &HashMap<(u64, u64), u64>) -> Result<(), MigrationError> {
    let mut names: HashMap<u64, Vec<&PathBuf>> = HashMap::new();
    for (path, id) in file_ids {
        names.entry(*id).or_default().push(path);
    }
    for (id, paths) in names.iter().filter(|(_, p)| p.len() > 1) {
        for path in paths {
            let meta = std::fs::symlink_metadata(root.join(path)).map_err(|e| differs(path, format!("cannot stat it: {e}")))?;
            if written.get(&(meta.dev(), meta.ino())) != Some(id) {
                return Err(differs(path, "hard links (the name holds another file)".into()));
            }
            if meta.nlink() != paths.len() as u64 {
                return Err(differs(path, format!("hard links (the file has {} names, the records give it {})", meta.nlink(), paths.len())));
            }
        }
    }
    Ok(())
}

pub(crate) fn differs(path: &Path, what: String) -> MigrationError {
    MigrationError::RootfsMismatch(format!("the destination's rootfs differs from the source's at /{}: {what}", path.display()))
}
