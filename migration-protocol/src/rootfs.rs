//! The root filesystem's wire records (protocol version 3).
//!
//! A rootfs pass is a run of entries, each complete in its own frames, so
//! that a file that changes while it is read can never push the stream out
//! of step (a tar header, by contrast, announces a size before the bytes):
//!
//! ```text
//!  RootfsEntry  (path, type, mode, owner, mtime, xattrs, target, device)
//!  └─ regular files only:
//!     RootfsFileData*  offset: u64 LE | bytes     (holes are never sent)
//!     RootfsFileEnd    size, SHA-256 of the file's bytes as sent (holes
//!                      read as zeros)
//!  RootfsDelete (path)                            (delta passes)
//!  RootfsEnd    JSON: phase, counts; the frozen pass adds the tree digest
//! ```
//!
//! The rootfs directory itself is the entry with path `.` (in the tree
//! digest, the empty path). Entry and delete payloads are protobuf messages (prost's derive, no
//! schema file): paths are bytes, because Linux file names need not be
//! UTF-8. The receiver treats every field as hostile ([`EntryRecord::check`]).
//!
//! # The tree digest
//! The frozen pass ends with the SHA-256 of the sender's whole tree as it
//! stands frozen: for every path in [`std::path::Path`] order, the path and
//! its [`TreeRecord`], each length-prefixed. The receiver computes the same
//! digest over its own tree, walked from disk, before it restores: equal
//! digests mean equal trees; on a difference it names the first path that
//! differs from the records it received.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use prost::Message;
use serde::{Deserialize, Serialize};

use crate::frame::MessageKind;
use crate::ProtocolError;

/// Longest path accepted (bytes, relative to the rootfs).
pub const MAX_PATH: usize = 4096;
/// Most extended attributes on one entry, and the largest value.
pub const MAX_XATTRS: usize = 64;
pub const MAX_XATTR_VALUE: usize = 64 * 1024;
/// How an entry names the rootfs directory itself.
pub const ROOT_PATH: &[u8] = b".";
/// Digest length (SHA-256).
pub const DIGEST_LEN: usize = 32;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum EntryKind {
    Directory = 1,
    File = 2,
    Symlink = 3,
    /// Another name for a regular file sent earlier in the same pass
    /// (`target` is that file's path).
    HardLink = 4,
    Fifo = 5,
    CharDevice = 6,
}

impl EntryKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Directory,
            2 => Self::File,
            3 => Self::Symlink,
            4 => Self::HardLink,
            5 => Self::Fifo,
            6 => Self::CharDevice,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Directory => "directory",
            Self::File => "file",
            Self::Symlink => "symlink",
            Self::HardLink => "hard link",
            Self::Fifo => "fifo",
            Self::CharDevice => "character device",
        }
    }
}

/// Character devices a rootfs may carry: the harmless standard ones.
/// `(major, minor, name)`.
pub const ALLOWED_DEVICES: [(u32, u32, &str); 8] = [
    (1, 3, "null"),
    (1, 5, "zero"),
    (1, 7, "full"),
    (1, 8, "random"),
    (1, 9, "urandom"),
    (5, 0, "tty"),
    (5, 1, "console"),
    (5, 2, "ptmx"),
];

/// Whether a character device `major:minor` is one ctmigrate recreates.
pub fn device_allowed(major: u32, minor: u32) -> bool {
    ALLOWED_DEVICES.iter().any(|&(a, b, _)| a == major && b == minor)
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Message)]
pub struct Xattr {
    #[prost(bytes = "vec", tag = "1")]
    pub name: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// One `RootfsEntry` frame.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct EntryRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    /// Permission bits, setuid, setgid and sticky (0o7777).
    #[prost(uint32, tag = "3")]
    pub mode: u32,
    #[prost(uint32, tag = "4")]
    pub uid: u32,
    #[prost(uint32, tag = "5")]
    pub gid: u32,
    #[prost(int64, tag = "6")]
    pub mtime_sec: i64,
    #[prost(uint32, tag = "7")]
    pub mtime_nsec: u32,
    #[prost(int64, tag = "8")]
    pub atime_sec: i64,
    #[prost(uint32, tag = "9")]
    pub atime_nsec: u32,
    #[prost(uint32, tag = "10")]
    pub rdev_major: u32,
    #[prost(uint32, tag = "11")]
    pub rdev_minor: u32,
    /// A symlink's target, or a hard link's file.
    #[prost(bytes = "vec", tag = "12")]
    pub target: Vec<u8>,
    /// Sorted by name.
    #[prost(message, repeated, tag = "13")]
    pub xattrs: Vec<Xattr>,
}

impl EntryRecord {
    pub fn kind(&self) -> Option<EntryKind> {
        EntryKind::from_u32(self.kind)
    }

    /// The rootfs directory itself (path `.`), whose owner, mode, times
    /// and xattrs are carried too.
    pub fn is_root(&self) -> bool {
        self.path == ROOT_PATH
    }

    /// The entry's path relative to the rootfs; empty for the rootfs itself.
    pub fn path(&self) -> &Path {
        if self.is_root() {
            return Path::new("");
        }
        Path::new(std::ffi::OsStr::from_bytes(&self.path))
    }

    pub fn target_path(&self) -> &Path {
        Path::new(std::ffi::OsStr::from_bytes(&self.target))
    }

    pub fn encode_frame(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes and checks an entry: a known kind, a safe relative path, a
    /// bounded target and xattrs, an allowed device.
    pub fn decode_checked(payload: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |reason: String| ProtocolError::Malformed { kind: MessageKind::RootfsEntry, reason };
        let e = Self::decode(payload).map_err(|e| bad(e.to_string()))?;
        let kind = e.kind().ok_or_else(|| bad(format!("unknown entry type {}", e.kind)))?;
        if e.is_root() {
            if kind != EntryKind::Directory {
                return Err(bad("the rootfs itself can only be a directory".into()));
            }
        } else {
            safe_relative(&e.path).map_err(bad)?;
        }
        if e.mode & !0o7777 != 0 {
            return Err(bad(format!("mode {:o} has bits beyond 0o7777", e.mode)));
        }
        if e.mtime_nsec >= 1_000_000_000 || e.atime_nsec >= 1_000_000_000 {
            return Err(bad("nanoseconds out of range".into()));
        }
        match kind {
            EntryKind::Symlink if e.target.is_empty() || e.target.len() > MAX_PATH || e.target.contains(&0) => {
                return Err(bad(format!("symlink {} has an empty or oversized target", e.path().display())));
            }
            EntryKind::Symlink => {}
            EntryKind::HardLink => {
                safe_relative(&e.target).map_err(|why| bad(format!("hard link {}: {why}", e.path().display())))?;
            }
            _ if !e.target.is_empty() => return Err(bad(format!("{} {} has a link target", kind.name(), e.path().display()))),
            _ => {}
        }
        if kind == EntryKind::CharDevice && !device_allowed(e.rdev_major, e.rdev_minor) {
            return Err(bad(format!(
                "device node {} ({}:{}) is not one of the standard devices ctmigrate recreates",
                e.path().display(),
                e.rdev_major,
                e.rdev_minor
            )));
        }
        if e.xattrs.len() > MAX_XATTRS {
            return Err(bad(format!("{} has {} extended attributes (at most {MAX_XATTRS})", e.path().display(), e.xattrs.len())));
        }
        for x in &e.xattrs {
            if x.name.is_empty() || x.name.len() > 255 || x.name.contains(&0) || x.value.len() > MAX_XATTR_VALUE {
                return Err(bad(format!("{} has a malformed extended attribute", e.path().display())));
            }
            if !xattr_name_allowed(&x.name) {
                return Err(bad(format!(
                    "{} carries extended attribute {}, which ctmigrate does not set",
                    e.path().display(),
                    String::from_utf8_lossy(&x.name)
                )));
            }
        }
        if !e.xattrs.windows(2).all(|w| w[0].name < w[1].name) {
            return Err(bad(format!("{}: extended attributes not sorted or repeated", e.path().display())));
        }
        Ok(e)
    }
}

/// Extended attribute namespaces carried: user data, capabilities and other
/// security labels, trusted (root-only) data, and POSIX ACLs.
pub fn xattr_name_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name.starts_with(b"security.")
        || name.starts_with(b"trusted.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// `RootfsFileData`: `offset: u64 LE | data`.
pub fn encode_file_data_prefix(offset: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&offset.to_le_bytes());
}

pub fn decode_file_data(payload: &[u8]) -> Result<(u64, &[u8]), ProtocolError> {
    if payload.len() < 8 {
        return Err(ProtocolError::Malformed { kind: MessageKind::RootfsFileData, reason: "shorter than its offset".into() });
    }
    Ok((u64::from_le_bytes(payload[..8].try_into().expect("8 bytes")), &payload[8..]))
}

/// `RootfsFileEnd`: the file's length and the digest of its bytes.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct FileEnd {
    #[prost(uint64, tag = "1")]
    pub size: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub digest: Vec<u8>,
}

impl FileEnd {
    pub fn decode_checked(payload: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |reason: String| ProtocolError::Malformed { kind: MessageKind::RootfsFileEnd, reason };
        let e = Self::decode(payload).map_err(|e| bad(e.to_string()))?;
        if e.digest.len() != DIGEST_LEN {
            return Err(bad(format!("digest of {} bytes", e.digest.len())));
        }
        Ok(e)
    }
}

/// `RootfsDelete`: a path removed since the previous pass (a directory
/// with everything below it).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct DeleteRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub path: Vec<u8>,
}

impl DeleteRecord {
    pub fn decode_checked(payload: &[u8]) -> Result<Self, ProtocolError> {
        let d = Self::decode(payload)
            .map_err(|e| ProtocolError::Malformed { kind: MessageKind::RootfsDelete, reason: e.to_string() })?;
        safe_relative(&d.path).map_err(|reason| ProtocolError::Malformed { kind: MessageKind::RootfsDelete, reason })?;
        Ok(d)
    }
}

/// Which rootfs pass a run of entries belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootfsPhase {
    /// Everything, sent while the container still runs.
    Initial,
    /// What changed since the previous pass, container still running.
    Delta,
    /// What changed since the previous pass, container frozen: the last
    /// pass, ending with the tree digest.
    Frozen,
}

/// Ends one rootfs pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsEnd {
    pub phase: RootfsPhase,
    /// Entries sent in this pass.
    pub entries: u64,
    /// Deletions sent in this pass.
    pub deleted: u64,
    /// Frozen pass: entries in the whole tree.
    #[serde(default)]
    pub tree_entries: u64,
    /// Frozen pass: the tree digest (hex SHA-256, see the module doc).
    #[serde(default)]
    pub tree_digest: String,
}

/// What the tree digest covers for one path: everything that makes two
/// trees the same except access times.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct TreeRecord {
    /// An [`EntryKind`]; hard links appear as files, grouped by `leader`.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(uint32, tag = "2")]
    pub mode: u32,
    #[prost(uint32, tag = "3")]
    pub uid: u32,
    #[prost(uint32, tag = "4")]
    pub gid: u32,
    #[prost(uint64, tag = "5")]
    pub size: u64,
    #[prost(int64, tag = "6")]
    pub mtime_sec: i64,
    #[prost(uint32, tag = "7")]
    pub mtime_nsec: u32,
    #[prost(uint32, tag = "8")]
    pub rdev_major: u32,
    #[prost(uint32, tag = "9")]
    pub rdev_minor: u32,
    #[prost(bytes = "vec", tag = "10")]
    pub target: Vec<u8>,
    #[prost(bytes = "vec", tag = "11")]
    pub digest: Vec<u8>,
    #[prost(message, repeated, tag = "12")]
    pub xattrs: Vec<Xattr>,
    /// For a file with more than one name in the tree: the first of those
    /// names in path order (empty otherwise).
    #[prost(bytes = "vec", tag = "13")]
    pub leader: Vec<u8>,
}

impl TreeRecord {
    /// What differs between two records, for an error message.
    pub fn difference(&self, other: &TreeRecord) -> String {
        let mut d = Vec::new();
        if self.kind != other.kind {
            let name = |k: u32| EntryKind::from_u32(k).map(EntryKind::name).unwrap_or("?");
            d.push(format!("type {} vs {}", name(self.kind), name(other.kind)));
        }
        if self.mode != other.mode {
            d.push(format!("mode {:o} vs {:o}", self.mode, other.mode));
        }
        if (self.uid, self.gid) != (other.uid, other.gid) {
            d.push(format!("owner {}:{} vs {}:{}", self.uid, self.gid, other.uid, other.gid));
        }
        if self.size != other.size {
            d.push(format!("size {} vs {}", self.size, other.size));
        }
        if (self.mtime_sec, self.mtime_nsec) != (other.mtime_sec, other.mtime_nsec) {
            d.push(format!("mtime {}.{:09} vs {}.{:09}", self.mtime_sec, self.mtime_nsec, other.mtime_sec, other.mtime_nsec));
        }
        if (self.rdev_major, self.rdev_minor) != (other.rdev_major, other.rdev_minor) {
            d.push("device number".into());
        }
        if self.target != other.target {
            d.push("link target".into());
        }
        if self.digest != other.digest {
            d.push("content".into());
        }
        if self.xattrs != other.xattrs {
            d.push("extended attributes".into());
        }
        if self.leader != other.leader {
            d.push("hard links".into());
        }
        d.join(", ")
    }
}

/// Fills in each record's `leader`: `groups` lists, for every path, a key
/// that is equal for the names of one file (its inode), or None.
pub fn assign_leaders<K: std::hash::Hash + Eq>(tree: &mut std::collections::BTreeMap<PathBuf, TreeRecord>, keys: &[(PathBuf, K)]) {
    let mut first: std::collections::HashMap<&K, (&PathBuf, usize)> = std::collections::HashMap::new();
    for (path, key) in keys {
        let slot = first.entry(key).or_insert((path, 0));
        if path < slot.0 {
            slot.0 = path;
        }
        slot.1 += 1;
    }
    for (path, key) in keys {
        let (leader, count) = first[key];
        if let Some(r) = tree.get_mut(path) {
            r.leader = if count > 1 { leader.as_os_str().as_bytes().to_vec() } else { Vec::new() };
        }
    }
}

/// Appends one entry's share of the tree digest's input to `out`.
pub fn digest_input_of(out: &mut Vec<u8>, path: &Path, record: &TreeRecord) {
    let path = path.as_os_str().as_bytes();
    out.extend_from_slice(&(path.len() as u64).to_le_bytes());
    out.extend_from_slice(path);
    out.extend_from_slice(&(record.encoded_len() as u64).to_le_bytes());
    record.encode_raw(out);
}

/// A path from the stream made safe to join onto the rootfs: relative,
/// non-empty, without `..`, `.`, root components or NUL, and bounded.
pub fn safe_relative(path: &[u8]) -> Result<PathBuf, String> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.is_empty() {
        return Err("empty rootfs path".into());
    }
    if path.len() > MAX_PATH || path.contains(&0) {
        return Err(format!("rootfs path {} is too long or holds a NUL byte", shown()));
    }
    let p = Path::new(std::ffi::OsStr::from_bytes(path));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(name) if name.len() <= 255 => out.push(name),
            _ => return Err(format!("rootfs path {} is absolute, has `.` or `..`, or a name over 255 bytes", shown())),
        }
    }
    if out.as_os_str().as_bytes() != path {
        return Err(format!("rootfs path {} is not in canonical form", shown()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> EntryRecord {
        EntryRecord { path: path.as_bytes().to_vec(), kind: kind as u32, mode: 0o644, ..Default::default() }
    }

    #[test]
    fn entries_round_trip_and_hostile_ones_are_refused() {
        let mut e = entry("usr/bin/ping", EntryKind::File);
        e.xattrs = vec![Xattr { name: b"security.capability".to_vec(), value: vec![1, 2, 3] }];
        let back = EntryRecord::decode_checked(&e.encode_frame()).unwrap();
        assert_eq!(back, e);

        let refused = |e: EntryRecord| EntryRecord::decode_checked(&e.encode_frame()).unwrap_err().to_string();
        for p in ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/", ""] {
            assert!(refused(entry(p, EntryKind::File)).contains("rootfs path"), "{p} accepted");
        }
        let mut dev = entry("dev/sda", EntryKind::CharDevice);
        (dev.rdev_major, dev.rdev_minor) = (8, 0);
        assert!(refused(dev).contains("device node dev/sda (8:0)"));
        let mut null = entry("dev/null", EntryKind::CharDevice);
        (null.rdev_major, null.rdev_minor) = (1, 3);
        EntryRecord::decode_checked(&null.encode_frame()).unwrap();
        let mut link = entry("a", EntryKind::HardLink);
        link.target = b"../../etc/shadow".to_vec();
        assert!(refused(link).contains("hard link a"));
        let mut x = entry("f", EntryKind::File);
        x.xattrs = vec![Xattr { name: b"system.nfs4_acl".to_vec(), value: vec![] }];
        assert!(refused(x).contains("does not set"));
        let mut m = entry("f", EntryKind::File);
        m.mode = 0o170644;
        assert!(refused(m).contains("mode"));
        let mut k = entry("f", EntryKind::File);
        k.kind = 99;
        assert!(refused(k).contains("unknown entry type"));
    }

    #[test]
    fn leaders_are_the_first_name_of_each_file() {
        let mut tree = std::collections::BTreeMap::new();
        for p in ["usr/bin/perl", "usr/bin/perl5.36.0", "usr/bin/zz", "a"] {
            tree.insert(PathBuf::from(p), TreeRecord { kind: EntryKind::File as u32, ..Default::default() });
        }
        let keys = vec![
            (PathBuf::from("usr/bin/perl5.36.0"), 7u64),
            (PathBuf::from("usr/bin/perl"), 7),
            (PathBuf::from("usr/bin/zz"), 8),
            (PathBuf::from("a"), 9),
        ];
        assign_leaders(&mut tree, &keys);
        assert_eq!(tree[Path::new("usr/bin/perl5.36.0")].leader, b"usr/bin/perl");
        assert_eq!(tree[Path::new("usr/bin/perl")].leader, b"usr/bin/perl");
        assert!(tree[Path::new("usr/bin/zz")].leader.is_empty());
    }

    #[test]
    fn the_digest_input_changes_with_any_field() {
        let mut record = TreeRecord { kind: 2, size: 3, ..Default::default() };
        let input = |r: &TreeRecord| {
            let mut out = Vec::new();
            digest_input_of(&mut out, Path::new("a"), r);
            out
        };
        let before = input(&record);
        record.mode = 0o600;
        assert_ne!(before, input(&record));
    }
}
