//! Fault injection lives only in test builds: the binary the tests run
//! (built with the `failpoints` feature, which the workspace's test builds
//! turn on) knows every failpoint, and the one `./install.sh` builds with a
//! plain `cargo build --release` holds none of their names.

mod common;

use common::*;

/// The failpoint names, from the table in migration-engine's
/// failpoints.rs (the one place that lists them).
fn failpoint_names() -> Vec<String> {
    let table = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/migration-engine/src/failpoints.rs")).unwrap();
    let names: Vec<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("//! | `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert!(names.len() > 15, "the failpoint table was not found: {names:?}");
    names
}

fn holds(binary: &std::path::Path, needle: &str) -> bool {
    let bytes = std::fs::read(binary).unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn release_binary_carries_no_fault_injection() {
    if !can_run(None) {
        return;
    }
    let installed = std::path::Path::new("/usr/local/bin/ctmigrate");
    assert!(installed.exists(), "{} missing: run ./install.sh", installed.display());
    let names = failpoint_names();
    let tested = std::path::Path::new(EXE);
    for name in names.iter().map(String::as_str).chain(["CTMIGRATE_FAILPOINTS"]) {
        assert!(holds(tested, name), "the test binary lacks failpoint {name}: the tests would inject nothing");
        assert!(!holds(installed, name), "{} carries failpoint {name}: fault injection reached a release build", installed.display());
    }
}
