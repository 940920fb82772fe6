//! tmpfs mounts that are empty when the container freezes, mounted anew on
//! the destination instead of archived by CRIU.
//!
//! CRIU saves every tmpfs of a container by running `tar --gzip` over it,
//! and restores it by running tar again: two programs per mount inside the
//! frozen window, also for the read-only empty tmpfs runc puts over masked
//! directories (/proc/acpi, /sys/firmware) and an unused /dev/shm. A tmpfs
//! with nothing in it is fully described by its options, so the dump names
//! it as an external mount and the receiver provides a new tmpfs with the
//! same options; CRIU bind-mounts that at the same place and applies the
//! mount's own flags (read-only, nosuid, ...). A tmpfs with anything in it
//! is left to CRIU.

use std::path::{Path, PathBuf};

use migration_protocol::EmptyTmpfsWire;
use serde::{Deserialize, Serialize};

use crate::procinfo::{self, MountInfo, MountInfos};

/// Most empty tmpfs mounts a manifest may list.
pub const MAX_EMPTY_TMPFS: usize = 32;

/// tmpfs options carried over; a mount with any other option (an SELinux
/// context, quotas, ...) is left to CRIU.
const KNOWN_OPTIONS: [&str; 8] = ["size", "nr_inodes", "mode", "uid", "gid", "inode64", "inode32", "huge"];

/// A tmpfs of the container, empty at the last look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyTmpfs {
    /// Where it is mounted, as the container sees it.
    pub mountpoint: String,
    /// The file system's options (`size=65536k`, `mode=755`, ...).
    pub options: Vec<String>,
    /// Whether the file system itself is read-only (runc's masks are).
    pub read_only: bool,
    /// `major:minor` of the file system on the source (not sent to be
    /// trusted: the sender uses it to find the same file system again).
    #[serde(skip)]
    pub device: Option<(u64, u64)>,
}

// Conversions to and from the Manifest's wire format. Infallible: an
// entry from a peer is checked afterwards, by [`EmptyTmpfs::validate`].
// The device is the source's own and never travels.

impl From<EmptyTmpfsWire> for EmptyTmpfs {
    fn from(wire: EmptyTmpfsWire) -> Self {
        let EmptyTmpfsWire { mountpoint, options, read_only } = wire;
        EmptyTmpfs { mountpoint, options, read_only, device: None }
    }
}

impl From<EmptyTmpfs> for EmptyTmpfsWire {
    fn from(tmpfs: EmptyTmpfs) -> Self {
        let EmptyTmpfs { mountpoint, options, read_only, device: _ } = tmpfs;
        EmptyTmpfsWire { mountpoint, options, read_only }
    }
}

impl EmptyTmpfs {
    /// The name by which CRIU's images refer to entry `index` of the list
    /// sent in the manifest.
    pub fn external_key(index: usize) -> String {
        format!("ctmigrate-tmpfs-{index}")
    }

    /// Checks an entry that came from a peer: an absolute, plain path and
    /// only known options with well-formed values.
    pub fn validate(&self) -> Result<(), String> {
        let mp = &self.mountpoint;
        let plain = mp.starts_with('/')
            && mp.len() <= 256
            && mp != "/"
            && mp.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
            && mp.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
        if !plain {
            return Err(format!("tmpfs mount point `{mp}` is not a plain absolute path"));
        }
        if self.options.len() > KNOWN_OPTIONS.len() {
            return Err(format!("tmpfs at {mp} has too many options"));
        }
        for o in &self.options {
            if !option_is_known(o) {
                return Err(format!("tmpfs at {mp} has option `{o}`, which is not one ctmigrate carries"));
            }
        }
        Ok(())
    }

    /// Whether the file system is still the one found at preflight and
    /// holds nothing but its root directory. Asked while the container is
    /// frozen, so the answer holds until the dump. Counting the file
    /// system's inodes, not listing a directory, keeps a path the
    /// container changed from giving a wrong "empty".
    pub fn still_empty(&self, pid: i32) -> bool {
        let path = Path::new("/proc").join(pid.to_string()).join("root").join(self.mountpoint.trim_start_matches('/'));
        let (Ok(st), Ok(fs)) = (nix::sys::stat::stat(&path), nix::sys::statfs::statfs(&path)) else { return false };
        let device = (nix::sys::stat::major(st.st_dev), nix::sys::stat::minor(st.st_dev));
        self.device == Some(device) && fs.files() > 0 && fs.files() - fs.files_free() == 1
    }
}

fn option_is_known(option: &str) -> bool {
    let (name, value) = option.split_once('=').unwrap_or((option, ""));
    let number = |v: &str| {
        let digits = v.strip_suffix(['k', 'K', 'm', 'M', 'g', 'G', '%']).unwrap_or(v);
        !digits.is_empty() && digits.len() <= 20 && digits.bytes().all(|b| b.is_ascii_digit())
    };
    KNOWN_OPTIONS.contains(&name)
        && match name {
            "inode64" | "inode32" => value.is_empty() && !option.contains('='),
            "size" | "nr_inodes" => number(value),
            "mode" => (1..=4).contains(&value.len()) && value.bytes().all(|b| (b'0'..=b'7').contains(&b)),
            "uid" | "gid" => !value.is_empty() && value.len() <= 10 && value.bytes().all(|b| b.is_ascii_digit()),
            "huge" => ["never", "always", "within_size", "advise"].contains(&value),
            _ => false,
        }
}

/// The container's tmpfs mounts that could be made anew: private (no
/// mount propagation), the whole file system (root `/`), nothing mounted
/// below, only known options, and empty now.
pub fn empty_tmpfs_mounts(pid: i32) -> Vec<EmptyTmpfs> {
    let Ok(mountinfo) = crate::procinfo::mountinfo(pid) else { return Vec::new() };
    candidates(&mountinfo).into_iter().filter(|t| t.still_empty(pid)).collect()
}

/// The candidates in a mount table, before looking inside them.
fn candidates(mountinfo: &MountInfos) -> Vec<EmptyTmpfs> {
    let rows: Vec<(&MountInfo, PathBuf)> = mountinfo.iter().map(|m| (m, procinfo::mount_point(m))).collect();
    let mut out = Vec::new();
    for (i, (row, mountpoint)) in rows.iter().enumerate() {
        if row.fs_type != "tmpfs" || row.root != "/" || !row.opt_fields.is_empty() {
            continue; // not tmpfs, a bind of part of one, or propagation fields present
        }
        let covered = rows.iter().any(|(r, m)| r.pid == row.mnt_id || procinfo::lies_below(m, mountpoint));
        let on_top = rows[i + 1..].iter().any(|(_, m)| m == mountpoint);
        if covered || on_top {
            continue;
        }
        let read_only = row.super_options.contains_key("ro");
        let mut options: Vec<String> = row
            .super_options
            .iter()
            .filter(|(name, _)| !["ro", "rw"].contains(&name.as_str()))
            .map(|(name, value)| match value {
                Some(v) => format!("{name}={v}"),
                None => name.clone(),
            })
            .collect();
        // procfs hands the options over unordered: they go in the order
        // the kernel writes them (that of KNOWN_OPTIONS), any other last.
        options.sort_by_key(|o| {
            let name = o.split_once('=').map_or(o.as_str(), |(n, _)| n);
            (KNOWN_OPTIONS.iter().position(|k| *k == name).unwrap_or(KNOWN_OPTIONS.len()), o.clone())
        });
        let device = row.majmin.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        let entry = EmptyTmpfs { mountpoint: mountpoint.to_string_lossy().into_owned(), options, read_only, device };
        if entry.validate().is_ok() && out.len() < MAX_EMPTY_TMPFS {
            out.push(entry);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
571 570 0:60 / / rw,relatime - overlay overlay rw
572 571 0:61 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
573 571 0:62 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755,inode64
574 573 0:63 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666
575 573 0:64 / /dev/shm rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k,inode64
580 572 0:70 / /proc/acpi ro,relatime - tmpfs tmpfs ro,inode64
581 571 0:71 / /sys/firmware ro,relatime shared:5 - tmpfs tmpfs ro,inode64
582 571 0:72 /sub /data rw,relatime - tmpfs tmpfs rw
583 571 0:73 / /run rw,relatime - tmpfs tmpfs rw,context=system_u:object_r:tmp_t
584 571 0:74 / /tmp rw,relatime - tmpfs tmpfs rw
585 571 0:75 / /tmp rw,relatime - tmpfs tmpfs rw
";

    fn table() -> MountInfos {
        <MountInfos as procinfo::FromBufRead>::from_buf_read(MOUNTINFO.as_bytes()).unwrap()
    }

    #[test]
    fn only_whole_private_leaf_tmpfs_with_known_options_are_candidates() {
        let found = candidates(&table());
        let points: Vec<&str> = found.iter().map(|t| t.mountpoint.as_str()).collect();
        // /dev has /dev/pts below; /sys/firmware propagates; /data is part
        // of a tmpfs; /run has an SELinux context; the first /tmp is under
        // the second.
        assert_eq!(points, vec!["/dev/shm", "/proc/acpi", "/tmp"]);
        assert_eq!(found[0].options, vec!["size=65536k", "inode64"]);
        assert!(!found[0].read_only);
        assert!(found[1].read_only);
        assert_eq!(found[1].device, Some((0, 70)));
    }

    /// The Manifest carries entries as migration-protocol's
    /// `EmptyTmpfsWire`: the same JSON, without the source's device.
    #[test]
    fn the_wire_format_is_the_entrys_json_without_the_device() {
        let found = candidates(&table());
        let wire: Vec<EmptyTmpfsWire> = found.iter().cloned().map(Into::into).collect();
        assert_eq!(serde_json::to_value(&wire).unwrap(), serde_json::to_value(&found).unwrap());
        let back: Vec<EmptyTmpfs> = wire.into_iter().map(Into::into).collect();
        assert!(back.iter().all(|t| t.device.is_none()));
        assert_eq!(back, found.into_iter().map(|t| EmptyTmpfs { device: None, ..t }).collect::<Vec<_>>());
    }

    #[test]
    fn hostile_entries_are_refused() {
        let ok = EmptyTmpfs { mountpoint: "/dev/shm".into(), options: vec!["size=64m".into(), "mode=1777".into()], read_only: false, device: None };
        assert!(ok.validate().is_ok());
        for (mountpoint, option) in [
            ("dev/shm", "size=1"),
            ("/", "size=1"),
            ("/dev/../etc", "size=1"),
            ("/dev//shm", "size=1"),
            ("/dev/shm x", "size=1"),
            ("/dev/shm", "size=1,mode=777"),
            ("/dev/shm", "mode=99999"),
            ("/dev/shm", "context=x"),
            ("/dev/shm", "inode64=1"),
            ("/dev/shm", "huge=sometimes"),
            ("/dev/shm", "size="),
        ] {
            let bad = EmptyTmpfs { mountpoint: mountpoint.into(), options: vec![option.into()], read_only: false, device: None };
            assert!(bad.validate().is_err(), "{mountpoint} {option} accepted");
        }
    }
}
