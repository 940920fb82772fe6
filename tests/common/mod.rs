//! Shared set-up for the root integration tests.
//!
//! These tests run real migrations (runc, CRIU, cgroups, network
//! namespaces), so they need root and the tools install.sh installs. Without
//! them a test prints why and returns; with CTMIGRATE_REQUIRE_ROOT_TESTS=1
//! (as CI sets) a missing prerequisite fails the test instead.

#![allow(dead_code)]

pub mod echo;

use std::path::Path;
use std::time::Duration;

#[allow(unused_imports)]
pub use migration_testbed::{read_counter, read_pattern_status, wait_for, Testbed, Workload};

pub const EXE: &str = env!("CARGO_BIN_EXE_ctmigrate");

fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["runc", "criu", "ip", "nsenter", "nft", "iptables-save"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} not installed (run ./install.sh)"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("busybox-static not installed (run ./install.sh)".into());
    }
    let fixture = migration_testbed::fixture_dir().join("pattern-fixture");
    if !fixture.exists() {
        return Some(format!("{} missing (run ./install.sh)", fixture.display()));
    }
    None
}

/// Whether a root test can run here: false (skip) after saying why when a
/// prerequisite, or `also` (a further one of the test's own), is missing;
/// with CTMIGRATE_REQUIRE_ROOT_TESTS=1 that fails the test instead.
pub fn can_run(also: Option<String>) -> bool {
    if let Some(why) = missing_prerequisite().or(also) {
        if std::env::var("CTMIGRATE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("root test cannot run: {why} (CTMIGRATE_REQUIRE_ROOT_TESTS=1)");
        }
        eprintln!("SKIPPED: {why}; set up with ./install.sh and run as root");
        return false;
    }
    true
}

/// A testbed, or None (skip) when prerequisites are missing and not required.
pub fn testbed(prefix: &str) -> Option<Testbed> {
    if !can_run(None) {
        return None;
    }
    Some(Testbed::create(prefix, Path::new(EXE)).expect("creating the testbed"))
}

/// A TCP port for one test's receiver, distinct across tests in one run.
pub fn port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    7000 + (std::process::id() % 1000) as u16 * 8 % 2000 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A running counter fixture on the source host, its id and its token.
pub fn start_counter(bed: &Testbed, name: &str) -> (migration_testbed::FixtureContainer, String, String) {
    let id = format!("{name}-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    (src, id, token)
}

/// The source runs as it was: thawed, running, counting on with its token.
pub fn assert_source_runs(bed: &Testbed, src: &migration_testbed::FixtureContainer, token: &str) {
    assert_eq!(frozen_state(bed, &src.id), "THAWED", "source left frozen");
    assert_eq!(bed.src_runc.state(&src.id).unwrap().status, "running");
    let (_, now) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), token, now);
}

/// Waits until the counter in `rootfs` reaches at least `min`.
pub fn counter_at_least(rootfs: &Path, min: u64) -> (String, u64) {
    wait_for(Duration::from_secs(15), || read_counter(rootfs).filter(|(_, n)| *n >= min))
        .unwrap_or_else(|| panic!("counter in {} never reached {min}", rootfs.display()))
}

/// Asserts the counter keeps going with the same token: the container runs
/// and was not restarted.
pub fn assert_counting_on(rootfs: &Path, token: &str, from: u64) -> u64 {
    let (tok, n) = wait_for(Duration::from_secs(15), || read_counter(rootfs).filter(|(_, n)| *n > from + 5))
        .unwrap_or_else(|| panic!("counter in {} stopped at or below {from}", rootfs.display()));
    assert_eq!(tok, token, "the container was restarted, not resumed");
    n
}

/// Asserts that neither host keeps anything of the migration of
/// `dest_id`, allowing a few seconds for a process still cleaning up (a
/// freeze guard removes the work directory after its thaw has held).
pub fn assert_clean(bed: &Testbed, dest_id: &str) {
    let clean = wait_for(Duration::from_secs(10), || bed.leftovers(dest_id).is_empty().then_some(()));
    if clean.is_none() {
        let left = bed.leftovers(dest_id);
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}

/// The source's freezer state: "THAWED", "FREEZING" or "FROZEN" (cgroup v1
/// names, also for v2).
pub fn frozen_state(bed: &Testbed, id: &str) -> String {
    let st = bed.src_runc.internal_state(id).expect("source state");
    let freezer = container_runtime::Freezer::for_container(&st).expect("a freezer");
    match freezer.state().expect("freezer state") {
        container_runtime::FreezerState::Thawed => "THAWED",
        container_runtime::FreezerState::Freezing => "FREEZING",
        container_runtime::FreezerState::Frozen => "FROZEN",
    }
    .to_string()
}

/// Migrates container `id` to `dest_id` (stop-copy, defaults) and asserts
/// that both sides succeeded; returns the sender's output.
pub fn migrate_ok(bed: &Testbed, id: &str, dest_id: &str) -> migration_testbed::CommandResult {
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(id, port, &["--dest-id", dest_id], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "send failed: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());
    sent
}

/// Samples both copies of a container every 100 ms while a migration
/// runs, to show that they never both make progress: the source's counter
/// (in its rootfs) and the destination's (once runc knows the restored
/// container; before that its counter file is only the migration's copy).
pub struct TwoCopyWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<CounterSample>>>,
}

/// One sample of both counters: the source's and the destination's.
type CounterSample = (Option<u64>, Option<u64>);

impl TwoCopyWatch {
    pub fn start(bed: &Testbed, src_rootfs: &Path, dest_id: &str) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let src_rootfs = src_rootfs.to_path_buf();
        let dst_rootfs = bed.dst_bundles().join(dest_id).join("rootfs");
        let dst_state = bed.dst_runc.root.join(dest_id).join("state.json");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let src = read_counter(&src_rootfs).map(|(_, n)| n);
                let dst = if dst_state.exists() { read_counter(&dst_rootfs).map(|(_, n)| n) } else { None };
                samples.push((src, dst));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops sampling; panics if both copies advanced between the same two
    /// samples. Returns the number of samples, and how many showed the
    /// source and the destination advancing.
    pub fn finish(mut self, what: &str) -> (usize, usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        let advanced = |a: Option<u64>, b: Option<u64>| matches!((a, b), (Some(a), Some(b)) if b > a);
        let (mut src_moves, mut dst_moves) = (0, 0);
        for (i, w) in samples.windows(2).enumerate() {
            let s = advanced(w[0].0, w[1].0);
            let d = advanced(w[0].1, w[1].1);
            src_moves += s as usize;
            dst_moves += d as usize;
            assert!(!(s && d), "{what}: both copies made progress between samples {i} and {} ({:?} -> {:?}): two copies ran at once", i + 1, w[0], w[1]);
        }
        (samples.len(), src_moves, dst_moves)
    }
}

impl Drop for TwoCopyWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
