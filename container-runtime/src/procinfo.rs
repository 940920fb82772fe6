//! What ctmigrate reads of /proc, through the `procfs` crate: one place
//! for the facts the runtime, the engine and its guard derive from a
//! task's stat, command line and mount table, so that none of those files
//! is parsed by hand anywhere.
//!
//! A process that is gone (or going) is never an error here: it is
//! `None`, `false` or an empty list, as the callers always treated it.

use std::path::{Path, PathBuf};

use procfs::process::{Process, ProcState};

pub use procfs::process::{MountInfo, MountInfos, Stat, Status};
pub use procfs::{FromBufRead, FromRead};

/// Whether process `pid` exists (a zombie does).
pub fn exists(pid: i32) -> bool {
    Process::new(pid).is_ok()
}

/// `/proc/PID/stat` of task `pid`; `None` once it is gone.
pub fn stat(pid: i32) -> Option<Stat> {
    Process::new(pid).and_then(|p| p.stat()).ok()
}

/// `/proc/PID/status` of task `pid`; `None` once it is gone.
pub fn status(pid: i32) -> Option<Status> {
    Process::new(pid).and_then(|p| p.status()).ok()
}

/// Whether the task `stat` describes has ended: a zombie, or dead.
pub fn has_ended(stat: &Stat) -> bool {
    matches!(stat.state(), Ok(ProcState::Zombie | ProcState::Dead))
}

/// The child processes of `pid` (of all its threads); none once it is gone.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = Process::new(pid as i32).and_then(|p| p.tasks()) else { return Vec::new() };
    tasks.flatten().filter_map(|t| t.children().ok()).flatten().collect()
}

/// A command line's arguments as the kernel has them, bytes: procfs's own
/// `Process::cmdline` refuses one that is not UTF-8, and the paths
/// ctmigrate looks for in them need not be.
struct RawCmdline(Vec<Vec<u8>>);

impl FromRead for RawCmdline {
    fn from_read<R: std::io::Read>(mut r: R) -> procfs::ProcResult<Self> {
        let mut buf = Vec::new();
        r.read_to_end(&mut buf)?;
        // Each argument ends with a NUL.
        let args = buf.strip_suffix(b"\0").unwrap_or(&buf);
        Ok(RawCmdline(if buf.is_empty() { Vec::new() } else { args.split(|b| *b == 0).map(<[u8]>::to_vec).collect() }))
    }
}

/// The arguments of process `pid`; `None` once it is gone, none for a
/// zombie or a kernel thread.
pub fn cmdline(pid: i32) -> Option<Vec<Vec<u8>>> {
    Process::new(pid).ok()?.read::<_, RawCmdline>("cmdline").ok().map(|c| c.0)
}

/// The processes other than this one whose command line has an argument
/// for which `matches` holds.
pub fn processes_with_argument(matches: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    let me = std::process::id() as i32;
    all.flatten()
        .filter(|p| p.pid != me)
        .filter(|p| p.read::<_, RawCmdline>("cmdline").is_ok_and(|c| c.0.iter().any(|a| matches(a))))
        .map(|p| p.pid)
        .collect()
}

/// The mount table of process `pid`'s mount namespace.
pub fn mountinfo(pid: i32) -> std::io::Result<MountInfos> {
    Process::new(pid).and_then(|p| p.mountinfo()).map_err(io_error)
}

/// The mount table of this process's mount namespace.
pub fn own_mountinfo() -> std::io::Result<MountInfos> {
    Process::myself().and_then(|p| p.mountinfo()).map_err(io_error)
}

/// A procfs error as the `io::Error` it stands for: a process or file
/// that is not there reads "No such file or directory", as it did when
/// the file was read directly.
fn io_error(e: procfs::ProcError) -> std::io::Error {
    match e {
        procfs::ProcError::Io(e, _) => e,
        procfs::ProcError::NotFound(_) => nix::errno::Errno::ENOENT.into(),
        procfs::ProcError::PermissionDenied(_) => nix::errno::Errno::EACCES.into(),
        other => std::io::Error::other(other.to_string()),
    }
}

/// Where `mount` is mounted, as a path. mountinfo writes space, tab,
/// newline and backslash in a path as `\ooo` (octal), and procfs hands
/// the field on as it is.
pub fn mount_point(mount: &MountInfo) -> PathBuf {
    let b = mount.mount_point.as_os_str().as_encoded_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Whether `path` lies strictly below directory `dir` (`/a/b` below `/a`,
/// `/ab` not, `/a` itself not).
pub fn lies_below(path: &Path, dir: &Path) -> bool {
    path != dir && path.starts_with(dir)
}

/// The mount points strictly below `dir` in a mount table, in its order.
pub fn mount_points_below(mounts: &MountInfos, dir: &Path) -> Vec<PathBuf> {
    mounts.iter().map(mount_point).filter(|m| lies_below(m, dir)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> MountInfos {
        MountInfos::from_buf_read(text.as_bytes()).unwrap()
    }

    #[test]
    fn escaped_mount_points_are_paths() {
        let mounts = table(
            "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
             25 22 0:7 / /my\\040data rw - tmpfs tmpfs rw\n\
             26 22 0:8 / /tab\\011and\\134slash rw - tmpfs tmpfs rw\n",
        );
        let points: Vec<PathBuf> = mounts.iter().map(mount_point).collect();
        assert_eq!(points, [PathBuf::from("/"), "/my data".into(), "/tab\tand\\slash".into()]);
    }

    #[test]
    fn mount_points_below_a_directory() {
        let mounts = table(
            "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
             23 22 0:5 / /work rw - tmpfs tmpfs rw\n\
             24 23 0:6 / /work/a\\040b rw - tmpfs tmpfs rw\n\
             25 24 0:7 / /work/a\\040b/c rw - tmpfs tmpfs rw\n\
             26 22 0:8 / /workshop rw - tmpfs tmpfs rw\n",
        );
        let below = mount_points_below(&mounts, Path::new("/work"));
        assert_eq!(below, [PathBuf::from("/work/a b"), "/work/a b/c".into()]);
        assert_eq!(mount_points_below(&mounts, Path::new("/")).len(), 4);
    }

    #[test]
    fn this_process_as_procfs_sees_it() {
        let me = std::process::id() as i32;
        assert!(exists(me));
        let stat = stat(me).unwrap();
        assert!(!has_ended(&stat));
        assert_eq!(stat.pid, me);
        let args = cmdline(me).unwrap();
        assert_eq!(args.first().map(|a| a.as_slice()), std::env::args_os().next().as_ref().map(|a| a.as_encoded_bytes()));
        assert!(status(me).is_some());
        assert!(own_mountinfo().unwrap().iter().any(|m| m.mount_point == Path::new("/")));
    }

    #[test]
    fn a_process_that_is_gone_is_not_an_error() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!exists(pid as i32));
        assert!(stat(pid as i32).is_none() && status(pid as i32).is_none() && cmdline(pid as i32).is_none());
        assert!(children_of(pid).is_empty());
        assert_eq!(mountinfo(pid as i32).err().map(|e| e.kind()), Some(std::io::ErrorKind::NotFound));
    }

    #[test]
    fn a_childs_command_line_in_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"not-utf8-\xff");
        // A shell waiting on its input (a builtin: no process of its own).
        let mut child =
            std::process::Command::new("sh").args(["-c", "read x"]).arg(odd).arg("").stdin(std::process::Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        // The child may still be this program until it has exec'd sh.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while cmdline(pid as i32).and_then(|a| a.first().cloned()) != Some(b"sh".to_vec()) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(cmdline(pid as i32).unwrap(), [b"sh".to_vec(), b"-c".to_vec(), b"read x".to_vec(), b"not-utf8-\xff".to_vec(), Vec::new()]);
        assert!(children_of(std::process::id()).contains(&pid));
        assert_eq!(processes_with_argument(|a| a == b"not-utf8-\xff"), [pid as i32]);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
