//! Where CRIU's images wait: a tmpfs of the migration's own when memory
//! allows. CRIU restores fastest from memory, tmpfs pages are never written
//! back to a disk, and the memory is returned the moment the images go.
//! Otherwise (`disk`, or too little memory) the images stay in the work
//! directory's file system.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use container_runtime::procinfo;

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
    use procfs::Current;
    procfs::Meminfo::current().ok().and_then(|m| m.mem_available).unwrap_or(0)
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

/// What the receiver sets aside, beside its images' reserve, for the
/// restore of a container of `memory` bytes: the restore's first read
/// block, handed over while the restore allocates it (see
/// [`Reserve::hand_over`]).
pub fn restore_block_bytes(memory: u64) -> u64 {
    memory.min(RESTORE_READ_BLOCK)
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
        Self::create_named(dir, "reserve", bytes)
    }

    /// Writes `bytes` (rounded up to MiB) into `dir/name`.
    pub fn create_named(dir: &Path, name: &str, bytes: u64) -> Result<Self, MigrationError> {
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
        let path = dir.join(name);
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

/// How much a [`HandOver`] gives back at a time, and keeps given back
/// ahead of what the task it follows has taken.
const HANDOVER_STEP: u64 = 8 << 20;
/// How often a [`HandOver`] looks at the task: CRIU's restore takes about
/// 1.3 MB a millisecond on this project's hosts, well inside a step.
const HANDOVER_POLL: std::time::Duration = std::time::Duration::from_millis(1);
/// A hand-over that sees no task this long gives everything back at once
/// (as before hand-overs): the memory must not be kept from the restore.
const HANDOVER_BLIND_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A task a [`HandOver`] follows: which it is, the CPU it last ran on and
/// the bytes it has resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSeen {
    pub pid: u32,
    pub cpu: usize,
    pub resident: u64,
}

impl Reserve {
    /// Gives the reserve back as the task `observe` reports takes memory,
    /// a step ahead of it, each step freed on the task's CPU, from a thread,
    /// until the returned guard is dropped (the rest goes then).
    ///
    /// Why: CRIU's restore allocates the container's first 128 MiB block
    /// with nothing freed before it on its CPU, and the kernel may then
    /// hand out pages the hypervisor has taken back (free page reporting):
    /// that block took 0.34-0.69 s to read in up to 5 of 12 migrations
    /// instead of 0.08-0.13 s. Pages freed on a CPU are handed out again on
    /// that CPU first (its per-CPU lists hold hundreds of MiB here), so each
    /// step is freed on the restorer's CPU just before it needs it. The
    /// task's own resident memory says what it took: free memory cannot,
    /// since pages on a CPU's lists are not counted free. See
    /// docs/performance-history.md, session 8.
    pub fn hand_over(mut self, mut observe: impl FnMut() -> Option<TaskSeen> + Send + 'static) -> HandOver {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let given = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop_flag, given_count) = (stop.clone(), given.clone());
        let thread = std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            let everywhere = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
            let started = std::time::Instant::now();
            let created = self.held();
            // The task followed, its resident bytes when first seen, and
            // what was given back since.
            let mut following: Option<(u32, u64)> = None;
            let mut given_to_task = 0u64;
            while !stop_flag.load(Ordering::Relaxed) && self.held() > 0 {
                match observe() {
                    Some(seen) => {
                        if following.map(|(pid, _)| pid) != Some(seen.pid) {
                            following = Some((seen.pid, seen.resident));
                            given_to_task = 0;
                        }
                        let taken = seen.resident.saturating_sub(following.map_or(0, |(_, base)| base));
                        if given_to_task < taken + HANDOVER_STEP {
                            // Freed on the task's CPU, then off it at once:
                            // a thread that stays there makes the scheduler
                            // move the restorer to another CPU (tried).
                            let mut set = nix::sched::CpuSet::new();
                            let pinned = set.set(seen.cpu).is_ok()
                                && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_ok();
                            while given_to_task < taken + HANDOVER_STEP && self.held() > 0 {
                                let step = HANDOVER_STEP.min(self.held());
                                self.release(step);
                                given_to_task += step;
                            }
                            if let (true, Some(all)) = (pinned, everywhere.as_ref()) {
                                let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), all);
                            }
                        }
                    }
                    None if following.is_none() && started.elapsed() > HANDOVER_BLIND_LIMIT => self.release(u64::MAX),
                    None => {}
                }
                given_count.store(created - self.held(), Ordering::Relaxed);
                std::thread::sleep(HANDOVER_POLL);
            }
            given_count.store(created - self.held(), Ordering::Relaxed);
        });
        HandOver { stop, given, thread: Some(thread) }
    }
}

/// The busiest task of a process tree: the running task with the most
/// resident memory among `root` and its descendants (during a restore, the
/// task whose memory CRIU is filling). The task found is looked at again on
/// each call and searched for anew every 32 calls (a Go runtime's many
/// threads make the search cost a few dozen reads).
pub struct BusiestTask {
    root: u32,
    task: Option<u32>,
    calls: u32,
    page_size: u64,
}

impl BusiestTask {
    pub fn new(root: u32) -> Self {
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
        Self { root, task: None, calls: 0, page_size }
    }

    pub fn seen(&mut self) -> Option<TaskSeen> {
        self.calls += 1;
        if self.task.is_none() || self.calls.is_multiple_of(32) {
            self.task = descendants(self.root)
                .into_iter()
                .filter_map(|pid| task_stat(pid).map(|st| (pid, st)))
                .filter(|(_, st)| st.running)
                .max_by_key(|(_, st)| st.rss_pages)
                .map(|(pid, _)| pid);
        }
        let pid = self.task?;
        let Some(stat) = task_stat(pid) else {
            self.task = None;
            return None;
        };
        Some(TaskSeen { pid, cpu: stat.cpu, resident: stat.rss_pages * self.page_size })
    }
}

struct TaskStat {
    running: bool,
    rss_pages: u64,
    cpu: usize,
}

/// A process's state, resident pages and last CPU, from /proc/PID/stat.
fn task_stat(pid: u32) -> Option<TaskStat> {
    let stat = procinfo::stat(pid as i32)?;
    let running = matches!(stat.state(), Ok(procfs::process::ProcState::Running));
    Some(TaskStat { running, rss_pages: stat.rss, cpu: usize::try_from(stat.processor?).ok()? })
}

/// `root` and every process below it, through each thread's children.
fn descendants(root: u32) -> Vec<u32> {
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let pid = found[next];
        next += 1;
        found.extend(procinfo::children_of(pid));
    }
    found
}

/// A reserve being given back as memory is taken; dropping it gives back
/// the rest. See [`Reserve::hand_over`].
pub struct HandOver {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    given: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HandOver {
    /// Bytes given back so far.
    pub fn given(&self) -> u64 {
        self.given.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for HandOver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
    // Whatever is mounted below: the images tmpfs, the receiver's empty
    // tmpfs mounts (a restored container holds its own bind of each, which
    // stays), and what a CRIU killed midway left (its cgroup yard).
    unmount_below(work_dir);
    let _ = std::fs::remove_dir_all(work_dir);
}

/// Unmounts everything mounted below `dir` (deepest first).
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = procinfo::own_mountinfo() else { return };
    let mut points = procinfo::mount_points_below(&mounts, dir);
    points.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in points {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receiver_sets_aside_the_restores_first_read_block() {
        assert_eq!(restore_block_bytes(64 << 20), 64 << 20);
        assert_eq!(restore_block_bytes(1 << 30), RESTORE_READ_BLOCK);
    }

    #[test]
    fn a_reserve_is_handed_over_as_the_task_takes_memory() {
        use std::os::unix::fs::MetadataExt;
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block");
        let total: u64 = 64 << 20;
        let held = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        // A simulated restorer: the test says what it holds.
        let task = Arc::new(Mutex::new(None::<TaskSeen>));
        let watched = task.clone();
        let handover = Reserve::create_named(dir.path(), "block", total).unwrap().hand_over(move || *watched.lock().unwrap());
        let settle = || std::thread::sleep(std::time::Duration::from_millis(50));
        settle();
        assert_eq!(handover.given(), 0, "nothing given back before the task is seen");
        // Seen holding 5 MiB (its own, not taken from us): one step ahead.
        *task.lock().unwrap() = Some(TaskSeen { pid: 7, cpu: 0, resident: 5 << 20 });
        settle();
        assert_eq!(handover.given(), HANDOVER_STEP);
        assert!(held(&path) <= total - HANDOVER_STEP, "{}", held(&path));
        // It takes 20 MiB: a step stays given back beyond that.
        *task.lock().unwrap() = Some(TaskSeen { pid: 7, cpu: 0, resident: 25 << 20 });
        settle();
        assert_eq!(handover.given(), 32 << 20, "20 MiB taken, rounded up to steps, plus one step ahead");
        // More than the reserve: all of it goes.
        *task.lock().unwrap() = Some(TaskSeen { pid: 7, cpu: 0, resident: 500 << 20 });
        settle();
        assert_eq!(handover.given(), total);
        assert_eq!(held(&path), 0);
        drop(handover);
        assert!(!path.exists(), "the reserve's file goes with the hand-over");
    }

    #[test]
    fn a_hand_over_that_sees_no_task_gives_everything_back() {
        let dir = tempfile::tempdir().unwrap();
        let handover = Reserve::create_named(dir.path(), "block", 16 << 20).unwrap().hand_over(|| None);
        std::thread::sleep(HANDOVER_BLIND_LIMIT + std::time::Duration::from_millis(200));
        assert_eq!(handover.given(), 16 << 20);
    }

    #[test]
    fn dropping_a_hand_over_gives_back_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let handover = Reserve::create_named(dir.path(), "block", 32 << 20).unwrap().hand_over(|| None);
        assert!(dir.path().join("block").exists());
        drop(handover);
        assert!(!dir.path().join("block").exists());
    }

    #[test]
    fn the_busiest_task_of_a_tree_is_found_on_its_cpu() {
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        let last = (0..nix::sched::CpuSet::count()).rfind(|c| cpus.is_set(*c).unwrap_or(false)).unwrap();
        // A shell that waits for a busy grandchild pinned to `last`: the
        // shell sleeps, so the busy one is found, below it.
        let mut tree = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("taskset -c {last} sh -c 'while :; do :; done'; :"))
            .spawn()
            .unwrap();
        let mut finder = BusiestTask::new(tree.id());
        let found = (0..200).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            // (Resident 0 is the moment of taskset's exec.)
            finder.seen().filter(|t| t.cpu == last && t.pid != tree.id() && t.resident > 0)
        });
        let busy = descendants(tree.id());
        for pid in busy.iter().skip(1) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = tree.kill();
        let _ = tree.wait();
        assert!(found.is_some(), "the busy grandchild on CPU {last} was not found (tree {busy:?})");
        assert_eq!(BusiestTask::new(u32::MAX - 1).seen(), None, "no such process");
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
