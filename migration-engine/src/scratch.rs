//! Where CRIU's images wait: a tmpfs of the migration's own when memory
//! allows. CRIU restores fastest from memory, tmpfs pages are never written
//! back to a disk, and the memory is returned the moment the images go.
//! Otherwise (`disk`, or too little memory) the images stay in the work
//! directory's file system.

use std::path::Path;

use crate::MigrationError;

/// `--stage-images`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StageMode {
    /// Memory when the images fit in half of the available memory.
    #[default]
    Auto,
    Memory,
    Disk,
}

/// Memory the kernel says it can give without swapping (MemAvailable).
pub fn available_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// The tmpfs size to give images of about `expected` bytes, or None to
/// stage them on disk.
pub fn memory_stage_size(mode: StageMode, expected: u64) -> Option<u64> {
    // Room for the images CRIU writes besides pages, and estimate error.
    let wanted = expected + expected / 4 + (64 << 20);
    let available = available_memory();
    match mode {
        StageMode::Disk => None,
        StageMode::Memory => Some(wanted.max(available / 2)),
        StageMode::Auto => (wanted <= available / 2).then_some(available / 2),
    }
}

/// Mounts a private tmpfs of at most `size` bytes on the (empty) `dir`.
pub fn mount_tmpfs(dir: &Path, size: u64) -> Result<(), MigrationError> {
    use nix::mount::{mount, MsFlags};
    let options = format!("size={size},mode=0700");
    mount(Some("tmpfs"), dir, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, Some(options.as_str()))
        .map_err(|e| MigrationError::Other(format!("mounting a tmpfs for the images on {}: {e}", dir.display())))
}

/// Removes a work directory, unmounting its images tmpfs first if it has
/// one (lazily: a CRIU that still holds a file there lets go later).
pub fn remove_work_dir(work_dir: &Path) {
    let images = work_dir.join("images");
    if is_mount_point(&images) {
        let _ = nix::mount::umount2(&images, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(work_dir);
}

fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(dir), dir.parent().map(std::fs::symlink_metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_choice() {
        assert_eq!(memory_stage_size(StageMode::Disk, 1), None);
        assert!(memory_stage_size(StageMode::Memory, u64::MAX / 4).is_some());
        assert_eq!(memory_stage_size(StageMode::Auto, u64::MAX / 4), None, "images larger than memory go to disk");
        assert!(available_memory() > 0);
        assert!(memory_stage_size(StageMode::Auto, 1 << 20).is_some());
    }
}
