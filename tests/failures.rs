//! Failure injection at each phase of a migration. Every test checks the
//! same promise: the source keeps running as it was (same token, still
//! counting, thawed), and neither host keeps anything of the attempt.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use migration_testbed::ChildProcess;

#[test]
fn sender_killed_while_frozen_is_thawed_by_its_guard() {
    let Some(bed) = testbed("skl") else { return };
    let (src, id, token) = start_counter(&bed, "sk");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let mut cmd = bed.send_command(&id, port, &[]);
    cmd.env("CTMIGRATE_FAILPOINTS", "sender-after-freeze=sleep:60000");
    let mut sender = ChildProcess::spawn(cmd).unwrap();
    wait_for(Duration::from_secs(20), || (frozen_state(&bed, &id) == "FROZEN").then_some(())).expect("never froze");
    // SIGKILL: the sender runs no code of its own after this.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sender.child.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let _ = sender.wait(Duration::from_secs(5));
    wait_for(Duration::from_secs(10), || (frozen_state(&bed, &id) == "THAWED").then_some(()))
        .expect("the guard did not thaw the source");
    assert_source_runs(&bed, &src, &token);
    // The receiver saw the connection drop and removed its staging.
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4), "{}", receiver.stderr());
    assert_clean(&bed, &id);
}

#[test]
fn sender_interrupted_rolls_back_and_reports() {
    let Some(bed) = testbed("sin") else { return };
    let (src, id, token) = start_counter(&bed, "si");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let mut cmd = bed.send_command(&id, port, &[]);
    cmd.env("CTMIGRATE_FAILPOINTS", "sender-after-freeze=sleep:2000");
    let mut sender = ChildProcess::spawn(cmd).unwrap();
    wait_for(Duration::from_secs(20), || (frozen_state(&bed, &id) == "FROZEN").then_some(())).expect("never froze");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sender.child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    assert_eq!(sender.wait(Duration::from_secs(30)), Some(4), "{}", sender.stderr());
    let result = sender.result().expect("a result event after Ctrl-C").clone();
    assert_eq!(result["source_state"], "running");
    assert!(result["error"].as_str().unwrap().contains("interrupted"), "{result}");
    assert_source_runs(&bed, &src, &token);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));
    assert_clean(&bed, &id);
}

#[test]
fn link_cut_during_transfer_times_out_and_rolls_back() {
    let Some(bed) = testbed("cut") else { return };
    let (src, id, token) = start_counter(&bed, "ct");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--timeout", "4"], &[]).unwrap();
    let mut cmd = bed.send_command(&id, port, &["--timeout", "4", "--restore-timeout", "6"]);
    cmd.env("CTMIGRATE_FAILPOINTS", "sender-after-freeze=sleep:1500");
    let mut sender = ChildProcess::spawn(cmd).unwrap();
    wait_for(Duration::from_secs(20), || (frozen_state(&bed, &id) == "FROZEN").then_some(())).expect("never froze");
    // Cut the cable: the source host's end of the link goes down.
    let st = Command::new("ip").args(["-n", &bed.hosts.src, "link", "set", &format!("{}s", bed.tag), "down"]).status();
    assert!(st.unwrap().success());
    assert_eq!(sender.wait(Duration::from_secs(60)), Some(4), "{}", sender.stderr());
    assert_source_runs(&bed, &src, &token);
    assert_eq!(receiver.wait(Duration::from_secs(60)), Some(4), "{}", receiver.stderr());
    assert_clean(&bed, &id);
}

#[test]
fn destination_disk_full_is_refused_and_source_resumes() {
    let Some(bed) = testbed("ful") else { return };
    let id = format!("full-{}", bed.tag);
    // 48 MiB of memory that does not compress, into a 16 MiB filesystem.
    let src = bed.start_fixture(&id, &Workload::Pattern { mib: 48, dirty_kib_per_s: 0 }).unwrap();
    let before = wait_for(Duration::from_secs(20), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1))
        .expect("fixture never verified");
    std::fs::create_dir_all(bed.dst_work()).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(bed.dst_work()).status();
    assert!(mounted.unwrap().success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(bed.dst_work());

    let port = port();
    // On disk, where the operator put the work directory (by default the
    // images would wait in a tmpfs of their own).
    let mut receiver = bed.spawn_receiver(port, &["--once", "--stage-images", "disk"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert!(sent.stderr.contains("No space left"), "the receiver's reason should reach the sender: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));

    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let after = wait_for(Duration::from_secs(20), || {
        read_pattern_status(&src.rootfs()).filter(|s| s.passes > before.passes + 1)
    })
    .expect("the source stopped verifying");
    assert_eq!(after.token, before.token);
    assert!(after.ok, "{}", after.line);
    assert_clean(&bed, &id);
}

#[test]
fn restore_failure_on_destination_rolls_back() {
    let Some(bed) = testbed("rsf") else { return };
    let (src, id, token) = start_counter(&bed, "rf");
    let port = port();
    let mut receiver =
        bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-before-restore=error")]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert!(sent.stderr.contains("receiver-before-restore"), "{}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));
    assert_source_runs(&bed, &src, &token);
    assert_clean(&bed, &id);
}

#[test]
fn a_failed_restore_keeps_criu_logs_and_the_errors_name_them() {
    let Some(bed) = testbed("rlg") else { return };
    let (src, id, token) = start_counter(&bed, "lg");
    let port = port();
    let mut receiver =
        bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-before-restore=corrupt")]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));
    assert_source_runs(&bed, &src, &token);
    assert_clean(&bed, &id);
    // Both sides kept their CRIU logs, and every file or directory the
    // errors name under the testbed exists.
    let failed = bed.dir.join("failed");
    let kept: Vec<std::path::PathBuf> = std::fs::read_dir(&failed).unwrap().flatten().map(|e| e.path()).collect();
    let restore_log = kept.iter().map(|d| d.join("work_restore.log")).find(|p| p.is_file()).expect("the receiver kept CRIU's restore log");
    assert!(std::fs::read_to_string(&restore_log).unwrap().contains("Error"), "CRIU's restore log says why");
    assert!(kept.iter().any(|d| d.join("final.log").is_file()), "the sender kept CRIU's dump log: {kept:?}");
    let receiver_error = receiver.result().unwrap()["error"].as_str().unwrap().to_string();
    for message in [sent.stderr.as_str(), receiver_error.as_str()] {
        let named: Vec<&str> = message
            .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ';' || c == ',')
            .filter(|w| w.starts_with(bed.dir.to_str().unwrap()))
            .collect();
        assert!(named.iter().any(|w| w.contains("/failed/")), "the error names the kept logs: {message}");
        for path in named {
            assert!(std::path::Path::new(path.trim_end_matches(['.', ':'])).exists(), "{path} named in `{message}` does not exist");
        }
    }
}

#[test]
fn relay_failing_mid_dump_stops_criu_and_source_resumes() {
    let Some(bed) = testbed("rly") else { return };
    let (src, id, token) = start_counter(&bed, "rl");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    // The relay stops after CRIU's first run of pages, CRIU still sending:
    // unless its socket is shut, CRIU waits on it for ever.
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_FAILPOINTS", "sender-during-relay=error")]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert!(sent.stderr.contains("sender-during-relay"), "the relay's failure is the one reported: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));
    assert_source_runs(&bed, &src, &token);
    assert_clean(&bed, &id);
}

#[test]
fn abort_after_restore_removes_the_destination_copy() {
    let Some(bed) = testbed("abr") else { return };
    let (src, id, token) = start_counter(&bed, "ab");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    // The destination restored and runs the container; then the sender
    // fails before Commit.
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_FAILPOINTS", "sender-before-commit=error")]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));
    assert!(receiver.events.iter().any(|e| e["phase"] == "commit"), "the receiver never restored");
    assert_source_runs(&bed, &src, &token);
    assert_clean(&bed, &id);
}

/// The receiver dies after journalling the Commit and before letting its
/// copy run: the sender cannot learn the outcome and keeps the source
/// frozen (exit 6, in doubt); the next receiver start finishes the
/// committed copy (its tasks run), and `ctmigrate resolve` on the source
/// host, told so by that receiver, removes the source.
#[test]
fn receiver_dying_after_commit_is_in_doubt_and_its_restart_finishes_the_copy() {
    let Some(bed) = testbed("unc") else { return };
    let (src, id, token) = start_counter(&bed, "uc");
    let port = port();
    let mut receiver =
        bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-after-commit-journalled=exit")]).unwrap();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let sent = bed.run_sender(&id, port, &["--timeout", "5", "--in-doubt-timeout", "2"], &[]).unwrap();
    assert_eq!(sent.code, Some(6), "{}", sent.stderr);
    assert_eq!(sent.result().unwrap()["source_state"], "in-doubt");
    let migration = sent.result().unwrap()["migration_id"].as_str().unwrap().to_string();
    let _ = receiver.wait(Duration::from_secs(10));
    // Neither copy runs: the source frozen, the destination's stopped.
    assert_eq!(frozen_state(&bed, &id), "FROZEN");
    assert!(bed.dst_runc.exists(&id).unwrap(), "the committed copy was removed");
    // (A FixtureContainer removes its container when dropped: paths only.)
    let dst_rootfs = bed.dst_bundles().join(&id).join("rootfs");
    let (_, dst_n) = read_counter(&dst_rootfs).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read_counter(&dst_rootfs).unwrap().1, dst_n, "the destination ran before its receiver finished the commit");
    // The receiver's restart lets the committed copy run.
    let mut next = bed.spawn_receiver(port, &[], &[]).unwrap();
    assert_counting_on(&dst_rootfs, &token, dst_n);
    let r = migration_testbed::CommandResult::run(bed.resolve_command("src", &migration, &[])).unwrap();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source was not removed");
    let (_, src_moves, dst_moves) = watch.finish("receiver died after commit");
    assert!(dst_moves > 0 && src_moves > 0);
    next.child.kill().unwrap();
    let _ = next.child.wait();
    migration_testbed::force_remove(&bed.dst_runc, &id);
    let _ = std::fs::remove_dir_all(bed.dst_bundles().join(&id));
    assert_clean(&bed, &id);
}

/// The tmpfs mounts at or under `dir` (from /proc/self/mountinfo).
fn tmpfs_mounts_under(dir: &std::path::Path) -> Vec<String> {
    use container_runtime::procinfo;
    procinfo::own_mountinfo()
        .unwrap()
        .iter()
        .filter(|m| m.fs_type == "tmpfs")
        .map(procinfo::mount_point)
        .filter(|m| m.starts_with(dir))
        .map(|m| m.display().to_string())
        .collect()
}

#[test]
fn images_wait_in_memory_on_both_sides_and_the_mounts_go() {
    let Some(bed) = testbed("stg") else { return };
    let (src, id, token) = start_counter(&bed, "st");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-before-restore=sleep:1500")]).unwrap();
    let mut sender = ChildProcess::spawn(bed.send_command(&id, port, &["--dest-id", &format!("{id}-d")])).unwrap();
    let seen = wait_for(Duration::from_secs(30), || {
        let (s, d) = (tmpfs_mounts_under(&bed.src_work()), tmpfs_mounts_under(&bed.dst_work()));
        (!s.is_empty() && !d.is_empty()).then_some((s, d))
    });
    assert_eq!(sender.wait(Duration::from_secs(60)), Some(0), "{}", sender.stderr());
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0));
    let (s, d) = seen.expect("no tmpfs for the images on both sides while the migration ran");
    assert!(s[0].ends_with("/images") && d[0].ends_with("/images"), "{s:?} {d:?}");
    assert!(tmpfs_mounts_under(&bed.src_work()).is_empty() && tmpfs_mounts_under(&bed.dst_work()).is_empty(), "an images tmpfs outlived the migration");
    let dst = bed.dst_container(&format!("{id}-d"));
    assert_counting_on(&dst.rootfs(), &token, 0);
    drop(src);
}
