//! Debian root filesystems for real services (`ctmigrate validate
//! --workload` and tests/workloads.rs), built on first use from Debian's
//! own packages with `mmdebstrap` and cached between runs (never
//! committed).
//!
//! A rootfs is built once into `/var/cache/ctmigrate/rootfs/.build-…` and
//! renamed to `/var/cache/ctmigrate/rootfs/<name>-<hash>` only when
//! mmdebstrap succeeded, so an interrupted build is never used; the hash
//! covers the suite, the variant, the package list and [`HELPER_VERSION`]
//! (bump it when the way a rootfs is made changes). Builds are serialised
//! by a lock file, across processes too; mmdebstrap and its children
//! inherit the lock, so a build left running by a killed test keeps it
//! until it is gone, and the next build then removes what it left
//! (unmounting the /proc, /sys and /dev/pts mmdebstrap mounted in it
//! first). Nothing ever writes to the cache:
//! users copy a rootfs into their bundle (`cp -a`, which keeps hard links,
//! owners, modes, device nodes and extended attributes) or mount it
//! read-only.
//!
//! The packages come from the Debian mirror the host's own apt sources
//! name (deb.debian.org when there is none); `CTMIGRATE_DEBIAN_MIRROR`
//! overrides it.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use container_runtime::procinfo;
use migration_engine::MigrationError;

/// Bump when the way a rootfs is built changes: every cached rootfs is
/// then rebuilt.
pub const HELPER_VERSION: u32 = 1;
pub const SUITE: &str = "bookworm";
pub const VARIANT: &str = "minbase";
pub const CACHE_ROOT: &str = "/var/cache/ctmigrate/rootfs";
/// Longest a build may take before it is killed.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A rootfs to build: a name for its cache directory and the packages
/// mmdebstrap installs on top of `minbase`.
#[derive(Debug, Clone, Copy)]
pub struct RootfsSpec {
    pub name: &'static str,
    pub packages: &'static [&'static str],
}

/// One rootfs for all the real services: PostgreSQL 15, Redis, nginx and
/// python3 (the lock holder's language).
pub const SERVICES: RootfsSpec =
    RootfsSpec { name: "services", packages: &["postgresql-15", "redis-server", "nginx-light", "python3"] };

/// Why a Debian rootfs cannot be built or used here, if it cannot: a
/// missing tool, and what to do about it.
pub fn missing_tool() -> Option<String> {
    for tool in ["mmdebstrap", "cp", "mount", "umount"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            let how = if tool == "mmdebstrap" { "run ./install.sh, or `apt-get install mmdebstrap`" } else { "run ./install.sh" };
            return Some(format!("{tool} not installed ({how})"));
        }
    }
    None
}

impl RootfsSpec {
    /// `<name>-<12 hex digits>`: the hash of everything that decides what
    /// the build makes.
    pub fn cache_name(&self) -> String {
        let mut packages: Vec<&str> = self.packages.to_vec();
        packages.sort_unstable();
        packages.dedup();
        let key = format!("helper=v{HELPER_VERSION}\nsuite={SUITE}\nvariant={VARIANT}\npackages={}\n", packages.join(","));
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{}", self.name, &hex[..12])
    }

    pub fn cache_dir(&self) -> PathBuf {
        Path::new(CACHE_ROOT).join(self.cache_name())
    }

    /// The cached rootfs, built first if it is not there. Returns its path
    /// and how long the build took (zero when it was cached). `note` gets
    /// one line when a build starts and one when it is done.
    pub fn get(&self, note: &dyn Fn(&str)) -> Result<(PathBuf, Duration), MigrationError> {
        let dir = self.cache_dir();
        if is_complete(&dir) {
            return Ok((dir, Duration::ZERO));
        }
        // One build at a time, in this process and across processes.
        static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = IN_PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(CACHE_ROOT).map_err(MigrationError::io(format!("creating {CACHE_ROOT}")))?;
        let lock = FileLock::take(&Path::new(CACHE_ROOT).join(".lock"))?;
        if is_complete(&dir) {
            return Ok((dir, Duration::ZERO));
        }
        if dir.exists() {
            return Err(MigrationError::Other(format!("{} exists but is not a complete rootfs: remove it by hand", dir.display())));
        }
        remove_stale_builds(&self.cache_name(), note)?;
        let started = Instant::now();
        let tmp = Path::new(CACHE_ROOT).join(format!(".build-{}-{}", self.cache_name(), std::process::id()));
        let log = Path::new(CACHE_ROOT).join(format!("{}.build.log", self.cache_name()));
        if let Err(e) = self.build(&tmp, &log, &lock, note) {
            let _ = remove_build_dir(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &dir).map_err(MigrationError::io(format!("renaming {} to {}", tmp.display(), dir.display())))?;
        let took = started.elapsed();
        note(&format!("built the Debian rootfs {} in {:.1} s (log: {})", dir.display(), took.as_secs_f64(), log.display()));
        Ok((dir, took))
    }

    fn build(&self, target: &Path, log: &Path, lock: &FileLock, note: &dyn Fn(&str)) -> Result<(), MigrationError> {
        let sources = apt_sources();
        let mut cmd = Command::new("mmdebstrap");
        cmd.arg("--mode=root")
            .arg(format!("--variant={VARIANT}"))
            .arg(format!("--include={}", self.packages.join(",")))
            .arg(SUITE)
            .arg(target)
            .args(&sources);
        let mut logf = std::fs::File::create(log).map_err(MigrationError::io(format!("creating {}", log.display())))?;
        let _ = writeln!(logf, "{cmd:?}");
        note(&format!(
            "building a Debian {SUITE} rootfs with mmdebstrap ({}) from {}: once, about a minute, cached in {CACHE_ROOT}",
            self.packages.join(", "),
            mirror_of(&sources)
        ));
        let lock_fd = {
            use std::os::fd::AsRawFd;
            lock.0.as_raw_fd()
        };
        // mmdebstrap and everything it starts inherit the lock: a build
        // whose test was killed holds it until its last process is gone,
        // so the next build never removes a directory still being written.
        // It dies with the test's thread, and has a process group of its
        // own, so that a timeout kills apt and dpkg too.
        // SAFETY: the closure runs in the forked child before exec and calls
        // only fcntl and prctl, which are async-signal-safe, and allocates
        // nothing (an OS error is a code, not an allocation); `lock_fd` is
        // open in the parent until after the spawn, since `lock` outlives it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(lock_fd, libc::F_SETFD, 0) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().map_err(MigrationError::io("opening the build log"))?)
            .stderr(logf)
            .process_group(0)
            .spawn()
            .map_err(|e| MigrationError::Preflight(format!("running mmdebstrap: {e} (install it: ./install.sh, or `apt-get install mmdebstrap`)")))?;
        let deadline = Instant::now() + BUILD_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    return Err(MigrationError::Other(format!(
                        "mmdebstrap did not finish within {BUILD_TIMEOUT:?}: check access to the Debian mirror {}; log: {}",
                        mirror_of(&sources),
                        log.display()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => return Err(MigrationError::io("waiting for mmdebstrap")(e)),
            }
        };
        if !status.success() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(build_failure(&text, &sources, &status.to_string(), log));
        }
        if !is_complete(target) {
            return Err(MigrationError::Other(format!("mmdebstrap succeeded but {} has no /usr/bin/env", target.display())));
        }
        Ok(())
    }
}

/// The mirror a set of `deb` lines names first.
fn mirror_of(sources: &[String]) -> String {
    sources.first().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("?").to_string()
}

/// What apt says when it cannot reach a mirror.
const UNREACHABLE: &[&str] = &[
    "Temporary failure resolving",
    "Could not resolve",
    "Could not connect",
    "Unable to connect",
    "Connection refused",
    "Connection timed out",
    "Network is unreachable",
    "No route to host",
    "Failed to fetch",
];

/// One line for a failed mmdebstrap: the mirror it could not reach and
/// what to do, or else the last error its log holds; the log's path
/// either way.
fn build_failure(log_text: &str, sources: &[String], status: &str, log: &Path) -> MigrationError {
    let mirror = mirror_of(sources);
    let unreachable = log_text.lines().find(|l| UNREACHABLE.iter().any(|p| l.contains(p)));
    if let Some(line) = unreachable {
        return MigrationError::Preflight(format!(
            "cannot download Debian's packages from {mirror} ({}): building the Debian {SUITE} rootfs needs network access to a Debian mirror; \
             allow it, or set CTMIGRATE_DEBIAN_MIRROR to one that is reachable (log: {})",
            line.trim(),
            log.display()
        ));
    }
    let last_error = log_text
        .lines()
        .rev()
        .find(|l| l.starts_with("E: "))
        .or_else(|| log_text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output")
        .trim();
    MigrationError::Other(format!(
        "mmdebstrap could not build the Debian {SUITE} rootfs from {mirror} ({status}): {last_error}; see the log {}",
        log.display()
    ))
}

fn is_complete(dir: &Path) -> bool {
    dir.join("usr/bin/env").is_file() && dir.join("etc/debian_version").is_file()
}

/// The `deb` lines for mmdebstrap: the suite, its updates and its security
/// suite, from the host's Debian mirrors.
pub fn apt_sources() -> Vec<String> {
    let entries = host_apt_entries();
    let is_debian = |uri: &str| uri.trim_end_matches('/').ends_with("/debian");
    let is_security = |uri: &str| uri.trim_end_matches('/').ends_with("/debian-security");
    let main = std::env::var("CTMIGRATE_DEBIAN_MIRROR").ok().filter(|m| !m.is_empty()).unwrap_or_else(|| {
        entries
            .iter()
            .find(|(uri, _)| is_debian(uri))
            .map(|(uri, _)| uri.clone())
            .unwrap_or_else(|| "http://deb.debian.org/debian".into())
    });
    let security = entries
        .iter()
        .find(|(uri, suites)| is_security(uri) || suites.iter().any(|s| s.ends_with("-security")))
        .map(|(uri, _)| uri.clone())
        .unwrap_or_else(|| "http://deb.debian.org/debian-security".into());
    let main = main.trim_end_matches('/').to_string();
    let security = security.trim_end_matches('/').to_string();
    vec![
        format!("deb {main} {SUITE} main"),
        format!("deb {main} {SUITE}-updates main"),
        format!("deb {security} {SUITE}-security main"),
    ]
}

/// `(URI, suites)` of every binary (`deb`) source the host's apt uses,
/// one-line and deb822 formats.
fn host_apt_entries() -> Vec<(String, Vec<String>)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let name = f.to_string_lossy();
        if name.ends_with(".sources") {
            // deb822: stanzas separated by blank lines.
            for stanza in text.split("\n\n") {
                let field = |key: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
                        .map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>())
                        .unwrap_or_default()
                };
                if !field("Types").iter().any(|t| t == "deb") {
                    continue;
                }
                let suites = field("Suites");
                for uri in field("URIs") {
                    out.push((uri, suites.clone()));
                }
            }
        } else if name.ends_with(".list") {
            for line in text.lines().map(str::trim) {
                let mut words = line.split_whitespace().peekable();
                if words.next() != Some("deb") {
                    continue;
                }
                if words.peek().is_some_and(|w| w.starts_with('[')) {
                    // Skip the options, `[...]`.
                    for w in words.by_ref() {
                        if w.ends_with(']') {
                            break;
                        }
                    }
                }
                if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                    out.push((uri.to_string(), vec![suite.to_string()]));
                }
            }
        }
    }
    out
}

/// Removes what interrupted builds of `cache_name` left (the lock is held).
fn remove_stale_builds(cache_name: &str, note: &dyn Fn(&str)) -> Result<(), MigrationError> {
    let prefix = format!(".build-{cache_name}-");
    let Ok(rd) = std::fs::read_dir(CACHE_ROOT) else { return Ok(()) };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            note(&format!("removing an interrupted rootfs build: {}", e.path().display()));
            remove_build_dir(&e.path())?;
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = procinfo::own_mountinfo() else { return Vec::new() };
    let mut out: Vec<PathBuf> = mounts.iter().map(procinfo::mount_point).filter(|m| m.starts_with(dir)).collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out
}

/// Removes a build directory. mmdebstrap mounts /proc, /sys and /dev
/// inside it while it runs; a build that was killed may leave them, and
/// removing through them would reach the host's: unmount first, and never
/// cross into another file system.
fn remove_build_dir(dir: &Path) -> Result<(), MigrationError> {
    for m in mounts_under(dir) {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(MigrationError::Other(format!("cannot unmount {left:?}; remove {} by hand", dir.display())));
    }
    let st = Command::new("rm").arg("-rf").arg("--one-file-system").arg(dir).status().map_err(MigrationError::io("running rm"))?;
    if !st.success() || dir.exists() {
        return Err(MigrationError::Other(format!("could not remove {}", dir.display())));
    }
    Ok(())
}

/// An exclusive flock on a file, released on drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &Path) -> Result<Self, MigrationError> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(MigrationError::io(format!("opening {}", path.display())))?;
        // Blocks while another process builds.
        // SAFETY: flock(2) on the descriptor `f` owns, open for the call; no
        // memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(MigrationError::io(format!("locking {}", path.display()))(std::io::Error::last_os_error()));
        }
        Ok(Self(f))
    }
}

/// Copies a cached rootfs to `dest` (which must not exist) with `cp -a`:
/// hard links, owners, modes, timestamps, device nodes, FIFOs and extended
/// attributes (security.capability included) are kept.
pub fn copy_rootfs(src: &Path, dest: &Path) -> Result<Duration, MigrationError> {
    let started = Instant::now();
    let out = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dest)
        .stdin(Stdio::null())
        .output()
        .map_err(MigrationError::io("running cp"))?;
    if !out.status.success() {
        return Err(MigrationError::Other(format!(
            "cp -a {} {}: {}",
            src.display(),
            dest.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(started.elapsed())
}

/// A cached rootfs mounted read-only at a path of the test's own, for
/// clients that run from it (`chroot`) without ever writing to the cache,
/// with a tmpfs of its own on /tmp for what they write. Unmounted on drop.
pub struct ReadOnlyRoot {
    pub path: PathBuf,
}

impl ReadOnlyRoot {
    pub fn mount(src: &Path, at: &Path) -> Result<Self, MigrationError> {
        std::fs::create_dir_all(at).map_err(MigrationError::io(format!("creating {}", at.display())))?;
        let run = |args: &[&std::ffi::OsStr]| -> Result<(), MigrationError> {
            let out = Command::new("mount").args(args).stdin(Stdio::null()).output().map_err(MigrationError::io("running mount"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(MigrationError::Other(format!("mount {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim())))
            }
        };
        run(&["--bind".as_ref(), src.as_os_str(), at.as_os_str()])?;
        let root = Self { path: at.to_path_buf() };
        // The bind mount shares no propagation with the host's, and is
        // read-only before anything runs from it.
        run(&["--make-private".as_ref(), at.as_os_str()])?;
        run(&["-o".as_ref(), "remount,bind,ro".as_ref(), at.as_os_str()])?;
        run(&["-t".as_ref(), "tmpfs".as_ref(), "-o".as_ref(), "size=512m,mode=1777".as_ref(), "tmpfs".as_ref(), at.join("tmp").as_os_str()])?;
        Ok(root)
    }
}

impl Drop for ReadOnlyRoot {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path.join("tmp"), nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// `(uid, gid)` of `user` in the rootfs's /etc/passwd.
pub fn user_ids(rootfs: &Path, user: &str) -> Result<(u32, u32), MigrationError> {
    let passwd = passwd_entry(rootfs, user)?;
    match (passwd[2].parse(), passwd[3].parse()) {
        (Ok(uid), Ok(gid)) => Ok((uid, gid)),
        _ => Err(MigrationError::Other(format!("{user}'s entry in {}/etc/passwd has no numeric ids", rootfs.display()))),
    }
}

/// `user`'s home directory in the rootfs's /etc/passwd.
pub fn user_home(rootfs: &Path, user: &str) -> Result<String, MigrationError> {
    Ok(passwd_entry(rootfs, user)?[5].clone())
}

/// The seven fields of `user`'s line in the rootfs's /etc/passwd.
fn passwd_entry(rootfs: &Path, user: &str) -> Result<Vec<String>, MigrationError> {
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).map_err(MigrationError::io("reading etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').map(String::from).collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == user)
        .ok_or_else(|| MigrationError::Other(format!("no user {user} in {}/etc/passwd", rootfs.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<String> {
        vec!["deb http://mirror.example/debian bookworm main".into(), "deb http://mirror.example/debian bookworm-updates main".into()]
    }

    #[test]
    fn an_unreachable_mirror_is_one_line_that_says_what_to_do() {
        let log = "I: running apt-get update...\n\
                   W: Failed to fetch http://mirror.example/debian/dists/bookworm/InRelease  Temporary failure resolving 'mirror.example'\n\
                   E: apt-get update -oAPT::Status-Fd=<$fd> -oDpkg::Use-Pty=false failed\n";
        let e = build_failure(log, &sources(), "exit status: 1", Path::new("/x/build.log"));
        let text = e.to_string();
        assert!(matches!(e, MigrationError::Preflight(_)), "{e:?}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("http://mirror.example/debian") && text.contains("Temporary failure resolving"), "{text}");
        assert!(text.contains("CTMIGRATE_DEBIAN_MIRROR") && text.contains("/x/build.log"), "{text}");
    }

    #[test]
    fn another_failure_names_the_last_error_and_the_log() {
        let log = "I: something\nE: Unable to locate package redis-server\nE: mmdebstrap failed\nI: removing tempdir\n";
        let text = build_failure(log, &sources(), "exit status: 1", Path::new("/x/build.log")).to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("E: mmdebstrap failed") && text.contains("/x/build.log") && text.contains("exit status: 1"), "{text}");
    }

    #[test]
    fn the_cache_key_is_the_one_built_rootfs_have() {
        // Changing it rebuilds every cached rootfs (about a minute).
        assert_eq!(SERVICES.cache_name(), "services-a901abd17027");
    }
}
