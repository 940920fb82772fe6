//! Where CRIU's images wait: a tmpfs of the migration's own when memory
//! allows. CRIU restores fastest from memory, tmpfs pages are never written
//! back to a disk, and the memory is returned the moment the images go.
//! Otherwise (`disk`, or too little memory) the images stay in the work
//! directory's file system.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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

/// CRIU's restorer reads page images in blocks of this size when it
/// punches them as it goes (`--auto-dedup`, its AUTO_DEDUP_OVERHEAD_BYTES):
/// the restore needs that much memory on top of the images at once.
const RESTORE_READ_BLOCK: u64 = 128 << 20;

/// What the receiver sets aside for a container of `memory` bytes: its
/// images and, given back just before the restore, the restore's first
/// read block, so that the restored memory starts in pages touched before
/// the freeze.
pub fn receiver_reserve_bytes(memory: u64) -> u64 {
    memory + memory.min(RESTORE_READ_BLOCK)
}

/// Mounts a private tmpfs of at most `size` bytes on the (empty) `dir`.
pub fn mount_tmpfs(dir: &Path, size: u64) -> Result<(), MigrationError> {
    mount_tmpfs_with(dir, &format!("size={size},mode=0700"), false, "the images")
}

/// Mounts a tmpfs with `options` on `dir`, never honouring set-uid bits,
/// device nodes or executables there; `what` says what it is for.
pub fn mount_tmpfs_with(dir: &Path, options: &str, read_only: bool, what: &str) -> Result<(), MigrationError> {
    use nix::mount::{mount, MsFlags};
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some("tmpfs"), dir, Some("tmpfs"), flags, Some(options))
        .map_err(|e| MigrationError::Other(format!("mounting a tmpfs ({options}) for {what} on {}: {e}", dir.display())))
}

/// Frees `len` bytes of `file` from `offset` (a hole; the size stays), so
/// that their memory or blocks go back at once. Best effort: a file system
/// that cannot punch holes just keeps them until the file goes.
pub(crate) fn free_range(file: &File, offset: u64, len: u64) {
    let _ = nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    );
}

/// Memory set aside in an images tmpfs before the source freezes and given
/// back as images arrive.
///
/// Two reasons. A migration whose images would not fit fails before the
/// container stops, not halfway through the frozen window. And the memory
/// is touched now: on hosts that back memory lazily and take freed memory
/// back (virtual machines with free page reporting), touching fresh memory
/// costs several times more than reusing memory just freed, so each image
/// chunk is written into pages the reserve has just let go of.
pub struct Reserve {
    file: File,
    /// None once adopted as an image file (then nothing is removed on drop).
    path: Option<PathBuf>,
    /// Bytes still held, from the start of the file.
    held: u64,
}

impl Reserve {
    /// Writes `bytes` (rounded up to MiB) into `dir/reserve`.
    pub fn create(dir: &Path, bytes: u64) -> Result<Self, MigrationError> {
        const STEP: usize = 1 << 20;
        let wanted = bytes.div_ceil(STEP as u64) * STEP as u64;
        let cannot = |why: String| {
            MigrationError::Other(format!(
                "cannot set aside {} MiB of memory for the images ({why}): free memory on this host or use --stage-images disk",
                wanted >> 20
            ))
        };
        // Checked first: a size claimed by the peer must not push this
        // host into swapping or the OOM killer.
        let available = available_memory();
        if wanted > available / 4 * 3 {
            return Err(cannot(format!("{} MiB available", available >> 20)));
        }
        let path = dir.join("reserve");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(MigrationError::io(format!("creating {}", path.display())))?;
        let mut reserve = Reserve { file, path: Some(path), held: 0 };
        // Written, not fallocated: tmpfs allocates on fallocate but
        // touches the memory only when it is written.
        let zeros = vec![0u8; STEP];
        while reserve.held < wanted {
            reserve.file.write_all_at(&zeros, reserve.held).map_err(|e| cannot(e.to_string()))?;
            reserve.held += STEP as u64;
        }
        Ok(reserve)
    }

    /// Gives back `bytes` (or what is left), just before that much image
    /// data is written.
    pub fn release(&mut self, bytes: u64) {
        let n = bytes.min(self.held);
        if n == 0 {
            return;
        }
        self.held -= n;
        free_range(&self.file, self.held, n);
    }

    /// Bytes still held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Becomes the image file at `path`, of which `current` holds the
    /// first `written` bytes (copied over first). The image's later chunks
    /// then land in memory touched before the freeze, with nothing to
    /// punch and no page to allocate for them. Returns the file, open for
    /// reading and writing, still as long as the reserve was: the caller
    /// truncates it to the image's size once that is known.
    pub fn adopt_as(mut self, path: &Path, current: &File, written: u64) -> Result<File, MigrationError> {
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < written {
            let want = buf.len().min((written - offset) as usize);
            current
                .read_exact_at(&mut buf[..want], offset)
                .map_err(MigrationError::io(format!("reading back {}", path.display())))?;
            self.file.write_all_at(&buf[..want], offset).map_err(MigrationError::io("writing into the staging reserve"))?;
            offset += want as u64;
        }
        let from = self.path.take().expect("a reserve is adopted once");
        if let Err(e) = std::fs::rename(&from, path) {
            self.path = Some(from);
            return Err(MigrationError::Io { context: format!("renaming the staging reserve to {}", path.display()), source: e });
        }
        self.file.try_clone().map_err(MigrationError::io("staging reserve"))
    }
}

impl Drop for Reserve {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where, in a receiver's work directory, the new tmpfs mounts for a
/// container's empty ones are made.
pub const EMPTY_TMPFS_DIR: &str = "empty-tmpfs";

/// Removes a work directory, unmounting its images tmpfs first if it has
/// one (lazily: a CRIU that still holds a file there lets go later).
pub fn remove_work_dir(work_dir: &Path) {
    let images = work_dir.join("images");
    if is_mount_point(&images) {
        let _ = nix::mount::umount2(&images, nix::mount::MntFlags::MNT_DETACH);
    }
    // The receiver's empty tmpfs mounts: a restored container holds its
    // own bind of each, which stays.
    for entry in std::fs::read_dir(work_dir.join(EMPTY_TMPFS_DIR)).into_iter().flatten().flatten() {
        if is_mount_point(&entry.path()) {
            let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
        }
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
    fn the_receiver_sets_aside_the_restores_first_read_block() {
        assert_eq!(receiver_reserve_bytes(64 << 20), 128 << 20);
        assert_eq!(receiver_reserve_bytes(1 << 30), (1 << 30) + RESTORE_READ_BLOCK);
    }

    #[test]
    fn stage_choice() {
        assert_eq!(memory_stage_size(StageMode::Disk, 1), None);
        assert!(memory_stage_size(StageMode::Memory, u64::MAX / 4).is_some());
        assert_eq!(memory_stage_size(StageMode::Auto, u64::MAX / 4), None, "images larger than memory go to disk");
        assert!(available_memory() > 0);
        assert!(memory_stage_size(StageMode::Auto, 1 << 20).is_some());
    }

    #[test]
    fn reserve_holds_memory_until_released() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        let mut r = Reserve::create(dir.path(), 3 * (1 << 20) + 1).unwrap();
        let path = dir.path().join("reserve");
        assert_eq!(r.held(), 4 << 20, "rounded up to whole MiB");
        assert!(allocated(&path) >= 4 << 20, "the reserve's bytes are really allocated");
        r.release(1 << 20);
        assert_eq!(r.held(), 3 << 20);
        assert!(allocated(&path) <= 3 << 20, "a release frees that much: {}", allocated(&path));
        r.release(u64::MAX);
        assert_eq!(r.held(), 0);
        assert_eq!(allocated(&path), 0);
        drop(r);
        assert!(!path.exists(), "the reserve goes with its owner");
    }

    #[test]
    fn reserve_larger_than_memory_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let err = Reserve::create(dir.path(), available_memory()).err().expect("all of memory cannot be set aside");
        assert!(err.to_string().contains("available"), "{err}");
        assert!(!dir.path().join("reserve").exists(), "nothing was written");
    }

    #[test]
    fn reserve_that_does_not_fit_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let limited = dir.path().join("small");
        std::fs::create_dir(&limited).unwrap();
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CTMIGRATE_REQUIRE_ROOT_TESTS").is_none(), "this test needs root");
            eprintln!("skipped: mounting a small tmpfs needs root");
            return;
        }
        mount_tmpfs(&limited, 2 << 20).unwrap();
        let err = Reserve::create(&limited, 8 << 20).err().expect("8 MiB cannot fit in 2 MiB");
        let _ = nix::mount::umount2(&limited, nix::mount::MntFlags::MNT_DETACH);
        let msg = err.to_string();
        assert!(msg.contains("cannot set aside 8 MiB") && msg.contains("--stage-images disk"), "{msg}");
    }
}
