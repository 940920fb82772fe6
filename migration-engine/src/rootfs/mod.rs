//! Copying the container's root filesystem, exactly or not at all.
//!
//! The sender sends the whole tree once while the container runs
//! ([`TreeSender::initial_pass`]), then only what changed ([`TreeSender::delta_pass`]):
//! once more while it runs, so that little is left, and a last time frozen.
//! Changes are known from inotify watches set on every directory before it
//! is read ([`tracker`]); where that is not possible (too many directories,
//! an overflowed queue, a renamed directory) a pass compares every entry's
//! stamp with the last pass's instead.
//!
//! The wire records are in [`migration_protocol::rootfs`]. The receiver
//! applies them through directory descriptors that never follow a symlink
//! ([`apply`]) and, before anything is restored, proves its tree equals
//! the sender's frozen tree ([`verify`]): same paths, types, modes, owners,
//! sizes, mtimes, link targets, hard links, device numbers, extended
//! attributes and file contents (SHA-256): each record is checked on disk
//! as it is applied, and the whole against the sender's tree digest.
//!
//! What is not copied: what the container's own mounts hide (runc's /dev
//! tmpfs, /proc, bind mounts: see [`scan::hidden_mount_points`]), unix
//! socket files (their owners make them again on restore), and any device
//! node but the standard harmless ones (others are refused before the
//! freeze). A change made through a shared writable mapping that the
//! kernel has not yet reported (no inotify event, no ctime change) can be
//! missed, as by any copy that does not stop the writer first.

pub mod apply;
pub mod scan;
pub mod send;
pub mod tracker;
pub mod verify;

pub use apply::{Applier, UnpackPolicy};
pub use scan::Snapshot;
pub use send::{PassReport, TreeSender};
pub use verify::Verified;

/// Bytes of file data per RootfsFileData frame.
pub const CHUNK: usize = 1 << 20;

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
