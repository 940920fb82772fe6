//! Containers whose processes run as a user other than root.
//!
//! CRIU reads every task's resource limits with prlimit(), which for a
//! task of another user needs CAP_SYS_RESOURCE. Where root lacks it (as on
//! the project's machines), only a CRIU with ctmigrate's rlimit patch
//! (criu-patches/, built by install.sh) can dump such a container; a stock
//! CRIU fails with "Can't get rlimit 0: Operation not permitted", and the
//! sender refuses such a container in preflight, before the freeze.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use migration_testbed::{FixtureContainer, Workload, COUNTER_SCRIPT};

const NOBODY: u32 = 65534;

/// A counter fixture whose process runs as uid and gid 65534 (`nobody`),
/// counting in /data/counter (/data is the user's; / stays root's, as in
/// any real root filesystem).
fn start_nonroot_counter(bed: &Testbed, id: &str) -> FixtureContainer {
    let bundle = bed.fixture_bundle(id, &Workload::Counter).unwrap();
    let path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["process"]["user"] = serde_json::json!({"uid": NOBODY, "gid": NOBODY});
    cfg["process"]["args"] = serde_json::json!(["/bin/sh", "-c", COUNTER_SCRIPT.replace("/counter", "/data/counter")]);
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let data = bundle.join("rootfs/data");
    std::fs::create_dir(&data).unwrap();
    nix::unistd::chown(&data, Some(nix::unistd::Uid::from_raw(NOBODY)), Some(nix::unistd::Gid::from_raw(NOBODY))).unwrap();
    FixtureContainer::start(bed.src_runc.clone(), id, &bundle).unwrap()
}

/// Where the counter of [`start_nonroot_counter`] writes, below a rootfs.
fn data(rootfs: PathBuf) -> PathBuf {
    rootfs.join("data")
}

/// Real, effective, saved and filesystem uids, then gids, of `pid`.
fn ids_of(pid: i32) -> (Vec<u32>, Vec<u32>) {
    let s = container_runtime::procinfo::status(pid).unwrap();
    (vec![s.ruid, s.euid, s.suid, s.fuid], vec![s.rgid, s.egid, s.sgid, s.fgid])
}

#[test]
fn nonroot_counter_migrates_and_keeps_its_user() {
    let Some(bed) = testbed("nru") else { return };
    let id = format!("nonroot-{}", bed.tag);
    let src = start_nonroot_counter(&bed, &id);
    let (token, before) = counter_at_least(&data(src.rootfs()), 10);
    let src_pid = bed.src_runc.state(&id).unwrap().pid;
    assert_eq!(ids_of(src_pid), (vec![NOBODY; 4], vec![NOBODY; 4]), "the fixture does not run as nobody");

    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(
        sent.code,
        Some(0),
        "send failed (a CRIU without ctmigrate's rlimit patch on a host without CAP_SYS_RESOURCE? run ./install.sh): {}",
        sent.stderr
    );
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());
    let result = sent.result().expect("a result event");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["source_state"], "migrated");

    // The source is gone.
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source container still exists");
    drop(src);

    // The destination runs it, as the same user, counting on from where it was.
    let dst = bed.dst_container(&id);
    let state = dst.runc.running(&dst.id).expect("the destination runs the container");
    assert_eq!(ids_of(state.pid), (vec![NOBODY; 4], vec![NOBODY; 4]), "the restored process changed user");
    let (tok_now, first) = read_counter(&data(dst.rootfs())).expect("a counter on the destination");
    assert_eq!(tok_now, token, "the container was restarted, not resumed");
    assert!(first >= before, "the counter went back from {before} to {first}");
    assert_counting_on(&data(dst.rootfs()), &token, first);

    // Nothing left once the migrated container is removed.
    drop(dst);
    std::fs::remove_dir_all(bed.dst_bundles().join(&id)).expect("the committed bundle");
    assert_clean(&bed, &id);
}

/// Without CAP_SYS_RESOURCE, a CRIU that does not carry the patch (here a
/// copy of the installed one with a byte appended: install.sh's record no
/// longer matches it) is refused before the freeze, naming the task.
#[test]
fn nonroot_refused_before_freeze_with_an_unpatched_criu() {
    let Some(bed) = testbed("nrr") else { return };
    if migration_engine::rlimit_support::has_cap_sys_resource() {
        eprintln!("SKIPPED: root has CAP_SYS_RESOURCE here, so any CRIU dumps non-root tasks");
        return;
    }
    let installed = migration_engine::rlimit_support::resolve_binary(Path::new("criu"));
    let unpatched = bed.dir.join("criu-unrecorded");
    std::fs::copy(&installed, &unpatched).unwrap();
    {
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(&unpatched).unwrap().write_all(b"\0").unwrap();
    }
    let id = format!("nonroot-{}", bed.tag);
    let src = start_nonroot_counter(&bed, &id);
    let (token, _) = counter_at_least(&data(src.rootfs()), 5);
    let pid = bed.src_runc.state(&id).unwrap().pid;

    // A receiver is there: without the preflight check the migration would
    // go on past preflight (and, this copy being the patched CRIU, succeed).
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_CRIU", unpatched.to_str().unwrap())]).unwrap();
    assert_eq!(sent.code, Some(3), "expected a preflight refusal: {}", sent.stderr);
    let result = sent.result().expect("a result event");
    assert_eq!(result["source_state"], "untouched", "{result}");
    let error = result["error"].as_str().unwrap();
    assert!(error.contains(&format!("task {pid} (uid {NOBODY}, sh)")), "the task is not named: {error}");
    assert!(error.contains("CAP_SYS_RESOURCE") && error.contains("install.sh"), "{error}");
    assert!(!error.contains('\n'), "one line: {error}");
    let phases: Vec<&str> = sent.events.iter().filter(|e| e["event"] == "phase").filter_map(|e| e["phase"].as_str()).collect();
    assert_eq!(phases, ["preflight"], "went past preflight: {:?}", sent.events);

    // The source never froze and counts on; the receiver got nothing.
    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let (_, n) = read_counter(&data(src.rootfs())).unwrap();
    assert_counting_on(&data(src.rootfs()), &token, n);
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    assert_clean(&bed, &id);
}
