//! The receiver as a service: its systemd unit verifies, a receiver
//! started with its configuration file alone serves a migration (log lines
//! on stderr, JSON events in the events file), and SIGTERM stops it
//! cleanly: exit 0 at once when idle, and during a migration exactly one
//! copy is left (the sender's source keeps running).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use migration_testbed::{ChildProcess, HostPair};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/ctmigrate-receiver.service");

/// `systemd-analyze verify` on the unit as shipped, but for the binary's
/// path (verify checks that ExecStart's program exists: this test's build
/// stands in for /usr/local/bin/ctmigrate).
#[test]
fn the_unit_file_verifies() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/ctmigrate receive --config /etc/ctmigrate/receiver.toml"), "{text}");
    let found = std::process::Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: systemd-analyze not installed (Debian's systemd package has it): the unit file is not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("ctmigrate-receiver.service");
    std::fs::write(&unit, text.replace("/usr/local/bin/ctmigrate", common::EXE)).unwrap();
    // --man=no: the man page it names is installed by install.sh, not here.
    let out = std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Unknown keys and bad values are warnings only: none may name the unit.
    let about_it: Vec<&str> = stderr.lines().filter(|l| l.contains("ctmigrate-receiver")).collect();
    assert!(about_it.is_empty(), "systemd-analyze verify: {about_it:#?}");
}

/// The configuration a test receiver runs with: what the testbed's
/// receive command passes as flags, as keys.
fn write_config(bed: &Testbed, port: u16, events: &Path) -> PathBuf {
    let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
    let text = format!(
        "# written by tests/service.rs\nlisten = \"{}:{port}\"\ntls-dir = {}\nbundle-root = {}\nruntime-root = {}\n\
         cgroup-parent = {:?}\nwork-dir = {}\naudit-log = {}\njournal-dir = {}\nmax-migrations = 2\nmax-bytes = \"8G\"\n\
         stage-images = \"auto\"\nevents = {}\n",
        bed.hosts.dst_ip,
        q(&bed.dst_tls()),
        q(&bed.dst_bundles()),
        q(&bed.dst_runc.root),
        bed.cgroup_parent,
        q(&bed.dst_work()),
        q(&bed.audit_log("dst")),
        q(&bed.journal_dir("dst")),
        q(events),
    );
    let path = bed.dir.join("receiver.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The events in the events file so far.
fn events_in(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn sigterm(child: &ChildProcess) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
}

#[test]
fn svc_a_receiver_with_its_config_file_alone_serves_and_stops_on_sigterm() {
    let Some(bed) = testbed("svc") else { return };
    let (_src, id, token) = start_counter(&bed, "svc");
    let port = port();
    let events = bed.dir.join("events").join("receiver-events.jsonl");
    let config = write_config(&bed, port, &events);
    let mut cmd = HostPair::command_in(&bed.hosts.dst, &bed.exe);
    cmd.arg("receive").arg("--config").arg(&config);
    let mut receiver = ChildProcess::spawn(cmd).unwrap();
    wait_for(Duration::from_secs(60), || events_in(&events).iter().any(|e| e["event"] == "listening").then_some(()))
        .unwrap_or_else(|| panic!("not listening: {}", receiver.stderr()));

    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "send failed: {}", sent.stderr);
    let dst = bed.dst_container(&id);
    let (tok, n) = read_counter(&dst.rootfs()).expect("counter on the destination");
    assert_eq!(tok, token, "restarted, not resumed");
    assert_counting_on(&dst.rootfs(), &token, n);
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source is gone");

    // The events went to the file, the log lines to stderr, apart.
    let result = wait_for(Duration::from_secs(10), || events_in(&events).into_iter().find(|e| e["event"] == "result"))
        .expect("a result event in the events file");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["role"], "receiver", "{result}");
    let stderr = receiver.stderr();
    assert!(stderr.contains(&format!("configuration read from {}", config.display())), "{stderr}");
    assert!(stderr.contains("listening on"), "{stderr}");
    assert!(!stderr.contains("{\""), "JSON on stderr: {stderr}");
    assert!(receiver.events.is_empty(), "nothing on stdout without `json`");

    // Idle: SIGTERM ends it at once, exit 0.
    let asked = Instant::now();
    sigterm(&receiver);
    let code = receiver.wait(Duration::from_secs(10));
    let took = asked.elapsed();
    assert_eq!(code, Some(0), "receiver: {}", receiver.stderr());
    assert!(took < Duration::from_secs(2), "stopped after {took:?}");
    migration_testbed::force_remove(&bed.dst_runc, &id);
}

/// SIGTERM to a receiver while a migration is staged (before the source
/// froze) and while its copy is restored but not committed (the source
/// frozen): each time the receiver exits 0, the sender reports the
/// rollback, the source runs on, nothing is left on the destination, and
/// the two copies never ran at once.
#[test]
fn svc_sigterm_during_a_migration_leaves_exactly_one_copy() {
    let Some(bed) = testbed("svt") else { return };
    for (n, failpoint) in ["receiver-after-manifest=sleep:2000", "receiver-after-restore=sleep:2000"].into_iter().enumerate() {
        let (src, id, token) = start_counter(&bed, &format!("svt{n}"));
        let port = port();
        let mut receiver = bed.spawn_receiver(port, &[], &[("CTMIGRATE_FAILPOINTS", failpoint)]).unwrap();
        let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
        let mut sender = ChildProcess::spawn(bed.send_command(&id, port, &[])).unwrap();
        let there = if n == 0 { bed.dst_bundles().join(&id) } else { bed.dst_runc.root.join(&id) };
        wait_for(Duration::from_secs(30), || there.exists().then_some(()))
            .unwrap_or_else(|| panic!("{failpoint}: {} never appeared: {}", there.display(), receiver.stderr()));
        sigterm(&receiver);
        let code = receiver.wait(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{failpoint}: receiver: {}", receiver.stderr());
        let code = sender.wait(Duration::from_secs(60));
        assert!(matches!(code, Some(3 | 4)), "{failpoint}: sender exit {code:?}: {}", sender.stderr());
        let result = sender.result().expect("the sender's result").clone();
        assert!(matches!(result["source_state"].as_str(), Some("running" | "untouched")), "{failpoint}: {result}");
        assert_source_runs(&bed, &src, &token);
        assert_clean(&bed, &id);
        std::thread::sleep(Duration::from_millis(500));
        let (samples, _, dst_moves) = watch.finish(failpoint);
        assert!(samples > 5 && dst_moves == 0, "{failpoint}: the destination's copy ran ({dst_moves} of {samples})");
        let note = receiver.events.iter().find(|e| e["event"] == "note" && e["message"].as_str().is_some_and(|m| m.contains("stopped by a signal")));
        assert!(note.is_some_and(|e| e["message"].as_str().unwrap().contains("1 rolled back")), "{failpoint}: {:?}", receiver.events);
    }
}
