//! Shared set-up for the root integration tests.
//!
//! These tests run real migrations (runc, CRIU, cgroups, network
//! namespaces), so they need root and the tools install.sh installs. Without
//! them a test prints why and returns; with CTMIGRATE_REQUIRE_ROOT_TESTS=1
//! (as CI sets) a missing prerequisite fails the test instead.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

#[allow(unused_imports)]
pub use migration_engine::testbed::{read_counter, read_pattern_status, wait_for, Testbed, Workload};

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
    let fixture = migration_engine::testbed::fixture_dir().join("pattern-fixture");
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

pub fn assert_clean(bed: &Testbed, dest_id: &str) {
    let left = bed.leftovers(dest_id);
    assert!(left.is_empty(), "left behind: {left:#?}");
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
pub fn migrate_ok(bed: &Testbed, id: &str, dest_id: &str) -> migration_engine::testbed::CommandResult {
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(id, port, &["--dest-id", dest_id], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "send failed: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());
    sent
}
