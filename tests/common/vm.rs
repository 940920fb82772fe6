//! A qemu guest booting Debian's own kernel, which tracks dirty memory
//! (soft-dirty), for the pre-copy tests this host's kernel cannot run.
//!
//! The guest sees the host's root read-only (9p) under a tmpfs overlay, so
//! the same test binary, ctmigrate, runc and CRIU run inside it. It has no
//! network device: its only traffic is between network namespaces the tests
//! create inside it. install.sh unpacks the kernel under GUEST_DIR.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const GUEST_DIR: &str = "/var/cache/ctmigrate/guest-kernel";

const INIT: &str = include_str!("../vm/init.sh");
const GUEST: &str = include_str!("../vm/guest.sh");
const MODULES: &[&str] = &[
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay",
];

pub struct GuestRun {
    pub exit_code: Option<i32>,
    /// The guest kernel's soft-lockup watchdog fired (it then panics and
    /// the guest stops: see `KERNEL_ARGS`).
    pub kernel_lockup: bool,
    pub output: String,
    pub console: String,
    pub elapsed: Duration,
}

/// Why the guest cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    let kver = std::fs::read_to_string(Path::new(GUEST_DIR).join("ready")).ok();
    if kver.is_none() {
        return Some(format!("no guest kernel in {GUEST_DIR} (run ./install.sh)"));
    }
    for tool in ["qemu-system-x86_64", "cpio"] {
        if !Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status().map(|s| s.success()).unwrap_or(false) {
            return Some(format!("{tool} not installed (run ./install.sh)"));
        }
    }
    None
}

/// The guest kernel's command line. A CPU stuck in the kernel for a minute
/// panics the guest at once (with every CPU's backtrace on the console)
/// rather than hanging until the timeout: under software emulation the
/// guest kernel has been seen, rarely, to lock up both CPUs while runc
/// started the first container, before ctmigrate ran at all.
const KERNEL_ARGS: &str = "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=5 \
    watchdog_thresh=30 softlockup_panic=1 softlockup_all_cpu_backtrace=1";

/// Boots the guest, runs `command` (a shell line) in it as root, returns
/// its output once the guest powers off (or `timeout` passes).
///
/// If the guest kernel locked up (see `KERNEL_ARGS`), the console is
/// printed and the guest is booted once more: a kernel lockup is the
/// emulator's or the guest kernel's failure, and a second one fails the run.
pub fn run_in_guest(command: &str, memory_mib: u32, timeout: Duration) -> GuestRun {
    let first = boot_and_run(command, memory_mib, timeout);
    if !first.kernel_lockup {
        return first;
    }
    eprintln!(
        "--- the guest kernel locked up after {:.0} s; booting it once more. Its console: ---\n{}\n--- end of console ---",
        first.elapsed.as_secs_f64(),
        first.console
    );
    boot_and_run(command, memory_mib, timeout)
}

fn boot_and_run(command: &str, memory_mib: u32, timeout: Duration) -> GuestRun {
    let kver = std::fs::read_to_string(Path::new(GUEST_DIR).join("ready")).unwrap().trim().to_string();
    let kroot = Path::new(GUEST_DIR).join("root");
    let work = tempdir();
    let results = work.join("results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("guest.sh"), GUEST).unwrap();
    std::fs::write(results.join("command"), format!("{command}\n")).unwrap();
    let initrd = build_initramfs(&work, &kroot, &kver);

    let started = Instant::now();
    let console = results.join("console.log");
    let share = |path: &Path, tag: &str, ro: bool| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", &memory_mib.to_string()])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-monitor", "none"])
        .arg("-kernel")
        .arg(kroot.join("boot").join(format!("vmlinuz-{kver}")))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", KERNEL_ARGS])
        .arg("-virtfs")
        .arg(share(Path::new("/"), "hostroot", true))
        .arg("-virtfs")
        .arg(share(&kroot.join("lib/modules"), "modules", true))
        .arg("-virtfs")
        .arg(share(&results, "results", false))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.wait();
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    let run = GuestRun {
        exit_code: std::fs::read_to_string(results.join("rc")).ok().and_then(|s| s.trim().parse().ok()),
        kernel_lockup: console.contains("soft lockup") && console.contains("Kernel panic"),
        output: std::fs::read_to_string(results.join("out.txt")).unwrap_or_default(),
        console,
        elapsed: started.elapsed(),
    };
    let _ = std::fs::remove_dir_all(&work);
    run
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ctmigrate-vm-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A newc cpio with busybox, /init and the modules needed to reach 9p.
fn build_initramfs(work: &Path, kroot: &Path, kver: &str) -> PathBuf {
    let tree = work.join("initramfs");
    for d in ["bin", "modules", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    std::fs::write(tree.join("init"), INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mods = kroot.join("lib/modules").join(kver);
    for m in MODULES {
        let found = walkdir_find(&mods, &format!("{m}.ko")).unwrap_or_else(|| panic!("module {m} not in {}", mods.display()));
        std::fs::copy(found, tree.join("modules").join(format!("{m}.ko"))).unwrap();
    }
    let out = work.join("initrd.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd '{}' && find . | cpio -o -H newc --quiet > '{}'", tree.display(), out.display()))
        .status()
        .unwrap();
    assert!(status.success(), "building the initramfs failed");
    out
}

fn walkdir_find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = walkdir_find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().map(|n| n == name).unwrap_or(false) {
            return Some(p);
        }
    }
    None
}
