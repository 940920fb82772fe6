//! `ctmigrate validate --workload`: a real service migrated under its
//! client by the built binary, as a user runs it (issue 16). Redis only:
//! tests/workloads.rs covers nginx and PostgreSQL through the same code
//! (migration_testbed::services and its neighbours).

mod common;

use std::process::{Command, Stdio};

use common::EXE;
use migration_testbed::debian;

/// Runs `ctmigrate ARGS` with `env`; returns its pid, exit code, result
/// event and stderr.
fn ctmigrate(args: &[&str], env: &[(&str, &str)]) -> (u32, Option<i32>, Option<serde_json::Value>, String) {
    let child = Command::new(EXE)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ctmigrate");
    let pid = child.id();
    let out = child.wait_with_output().expect("waiting for ctmigrate");
    let result = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "result");
    (pid, out.status.code(), result, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// What a validate run with process id `pid` may have left: its hosts'
/// network namespaces (`ctm-val<pid>…`) and its testbed directory.
fn leftovers_of(pid: u32) -> Vec<String> {
    let tag = format!("val{}", pid % 100_000);
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    left.extend(netns.lines().filter(|l| l.starts_with(&format!("ctm-{tag}"))).map(|l| format!("network namespace {l}")));
    if let Ok(rd) = std::fs::read_dir(migration_engine::DEFAULT_WORK_ROOT) {
        left.extend(
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("testbed-{tag}")))
                .map(|e| format!("testbed directory {}", e.path().display())),
        );
    }
    left
}

#[test]
fn validate_workload_redis_json_passes() {
    if !common::can_run(debian::missing_tool()) {
        return;
    }
    let (pid, code, result, stderr) = ctmigrate(&["validate", "--workload", "redis", "--json"], &[]);
    assert_eq!(code, Some(0), "validate --workload redis failed: {stderr}");
    let result = result.expect("validate prints a result event");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["role"], "validate", "{result}");
    assert_eq!(result["workload"], "redis", "{result}");
    let answers = result["answers_checked"].as_u64().unwrap_or(0);
    assert!(answers > 0, "the client checked no answers: {result}");
    assert!(result["client_longest_gap_ms"].as_u64().is_some(), "{result}");
    assert!(result["frozen_ms"].as_u64().is_some(), "{result}");
    assert!(result["bytes_sent"].as_u64().unwrap_or(0) > 0, "{result}");
    assert_eq!(result["rootfs_verified"], true, "{result}");
    let left = leftovers_of(pid);
    assert!(left.is_empty(), "validate left behind: {left:#?}");
    eprintln!("validate --workload redis: {result}");
}

#[test]
fn validate_workload_without_mmdebstrap_fails_with_one_line() {
    if !common::can_run(None) {
        return;
    }
    // An empty PATH: no mmdebstrap (nor anything else) to be found.
    let empty = tempfile::tempdir().unwrap();
    let path = empty.path().to_str().unwrap();
    let (pid, code, result, stderr) = ctmigrate(&["validate", "--workload", "nginx", "--json"], &[("PATH", path)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("mmdebstrap not installed") && stderr.contains("install"), "{stderr}");
    let result = result.expect("a result event");
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(result["workload"], "nginx", "{result}");
    assert!(leftovers_of(pid).is_empty(), "{:?}", leftovers_of(pid));
}

#[test]
fn validate_workload_without_the_debian_mirror_fails_with_one_line() {
    if !common::can_run(debian::missing_tool()) {
        return;
    }
    // No rootfs cached (an empty tmpfs over the cache, in a mount
    // namespace of this run's own) and no network at all: the first run
    // on a host without access to Debian's mirror.
    std::fs::create_dir_all(debian::CACHE_ROOT).unwrap();
    let cached = || debian::SERVICES.cache_dir().join("usr/bin/env").is_file();
    let cached_before = cached();
    let script = format!("mount -t tmpfs tmpfs {} && exec \"$0\" validate --workload redis --json", debian::CACHE_ROOT);
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--net", "sh", "-c", &script, EXE])
        .stdin(Stdio::null())
        .output()
        .expect("running unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("cannot download Debian's packages") && stderr.contains("CTMIGRATE_DEBIAN_MIRROR"),
        "says what failed and what to do: {stderr}"
    );
    let result = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "result")
        .expect("a result event");
    assert_eq!(result["ok"], false, "{result}");
    assert_eq!(cached(), cached_before, "the host's rootfs cache was changed");
}
