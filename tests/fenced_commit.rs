//! Exactly one copy: the fenced commit. The destination restores with its
//! tasks stopped and lets them run only after the sender's Commit; a side
//! that cannot know the outcome keeps its copy stopped or frozen and asks.
//! Each test samples both copies every 100 ms while it injects its fault
//! (a hung receiver, a lost acknowledgement, a killed side, a cut link)
//! and checks that they never both made progress, that afterwards exactly
//! one runs with its state (the counter's token: not restarted), and that
//! neither host keeps anything of the attempt (journals settled too).

mod common;

use std::time::Duration;

use common::*;
use migration_testbed::{ChildProcess, FixtureContainer};

/// The source runs as it was, and the destination has no copy.
fn assert_only_source_runs(bed: &Testbed, src: &FixtureContainer, token: &str) {
    assert_source_runs(bed, src, token);
    assert!(!bed.dst_runc.exists(&src.id).unwrap(), "the destination still has a copy");
}

fn assert_destination_runs(bed: &Testbed, id: &str, token: &str) {
    let dst = bed.dst_container(id);
    let (_, now) = read_counter(&dst.rootfs()).expect("the destination's counter");
    assert_counting_on(&dst.rootfs(), token, now);
    assert!(!bed.src_runc.exists(id).unwrap(), "the source still exists");
}

/// After a migration that landed: the destination's copy goes too, so that
/// what is left can be checked.
fn remove_destination_copy(bed: &Testbed, id: &str) {
    migration_testbed::force_remove(&bed.dst_runc, id);
    let _ = std::fs::remove_dir_all(bed.dst_bundles().join(id));
}

/// Starts a migration whose receiver pauses 1.5 s once the Commit is
/// journalled, and cuts the link then: the Commit is in, its
/// acknowledgement cannot come out. The sender's `--timeout` is `timeout`.
fn cut_after_commit(bed: &Testbed, id: &str, port: u16, timeout: &str) -> (ChildProcess, ChildProcess) {
    let mut receiver =
        bed.spawn_receiver(port, &[], &[("CTMIGRATE_FAILPOINTS", "receiver-after-commit-journalled=sleep:1500")]).unwrap();
    let sender = ChildProcess::spawn(bed.send_command(id, port, &["--timeout", timeout, "--in-doubt-timeout", "60"])).unwrap();
    assert!(receiver.reached_phase("commit", Duration::from_secs(60)), "the receiver never reached the commit");
    // The Commit is on its way or in: cut before the acknowledgement.
    std::thread::sleep(Duration::from_millis(300));
    bed.cut_link().unwrap();
    (receiver, sender)
}

fn migration_id(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .find_map(|e| (e["event"] == "result").then(|| e["migration_id"].as_str().map(str::to_string)).flatten())
        .expect("a result with a migration id")
}

fn run(cmd: std::process::Command) -> migration_testbed::CommandResult {
    migration_testbed::CommandResult::run(cmd).unwrap()
}

/// The receiver stops answering right after its restore (a hung agent):
/// the sender gives up and resumes the source, and the destination's copy,
/// stopped, never ran; the receiver then removes it.
#[test]
fn fence_hung_receiver_after_restore_never_runs_a_second_copy() {
    let Some(bed) = testbed("fhr") else { return };
    let (src, id, token) = start_counter(&bed, "fh");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-after-restore=sleep:6000")]).unwrap();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let sent = bed.run_sender(&id, port, &["--restore-timeout", "3"], &[]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert_eq!(sent.result().unwrap()["source_state"], "running");
    // While the receiver sleeps its copy exists, stopped, and the source runs.
    let held = wait_for(Duration::from_secs(5), || bed.dst_runc.exists(&id).ok().filter(|e| *e));
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4), "{}", receiver.stderr());
    let (samples, src_moves, dst_moves) = watch.finish("hung receiver");
    assert!(held.is_some(), "the destination never held a restored copy: the fault was not where intended");
    assert_eq!(dst_moves, 0, "the destination's stopped copy made progress");
    assert!(src_moves > 5 && samples > 30, "{samples} samples, source moved in {src_moves}");
    assert_only_source_runs(&bed, &src, &token);
    assert_clean(&bed, &id);
}

/// The receiver dies after letting its copy run and before acknowledging:
/// the sender cannot learn the outcome, keeps the source frozen (exit 6,
/// in doubt), and `ctmigrate resolve` settles it once the destination
/// answers again: the source is removed, the destination's copy runs on.
#[test]
fn fence_lost_acknowledgement_leaves_the_source_frozen_until_resolved() {
    let Some(bed) = testbed("fla") else { return };
    let (src, id, token) = start_counter(&bed, "fl");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-before-commit-ack=exit")]).unwrap();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let sent = bed.run_sender(&id, port, &["--timeout", "3", "--in-doubt-timeout", "3"], &[]).unwrap();
    let _ = receiver.wait(Duration::from_secs(10));
    assert_eq!(sent.code, Some(6), "{}", sent.stderr);
    assert_eq!(sent.result().unwrap()["source_state"], "in-doubt");
    assert!(sent.stderr.contains("ctmigrate resolve"), "{}", sent.stderr);
    let id_m = migration_id(&sent.events);
    // In doubt: frozen, not running, not deleted.
    assert_eq!(frozen_state(&bed, &id), "FROZEN");
    let status = run({
        let mut c = std::process::Command::new(EXE);
        c.args(["status", "--json", "--journal-dir"]).arg(bed.journal_dir("src"));
        c
    });
    assert!(status.stdout.contains(&id_m) && status.stdout.contains("\"in_doubt\":true"), "{}", status.stdout);
    // The destination is unreachable: plain resolve keeps it in doubt.
    let r = run(bed.resolve_command("src", &id_m, &["--timeout", "2"]));
    assert_eq!(r.code, Some(6), "{}", r.stderr);
    assert_eq!(frozen_state(&bed, &id), "FROZEN");
    // --keep source against a destination that runs it cannot be checked
    // while it is unreachable... so the destination comes back first, and
    // then it says it committed: keeping the source is refused.
    let mut again = bed.spawn_receiver(port, &[], &[]).unwrap();
    let r = run(bed.resolve_command("src", &id_m, &["--keep", "source"]));
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("--keep destination"), "{}", r.stderr);
    let r = run(bed.resolve_command("src", &id_m, &[]));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let (_, src_moves, dst_moves) = watch.finish("lost acknowledgement");
    assert!(dst_moves > 3, "the destination's copy did not run ({dst_moves})");
    let _ = src_moves;
    assert_destination_runs(&bed, &id, &token);
    again.child.kill().unwrap();
    let _ = again.child.wait();
    remove_destination_copy(&bed, &id);
    assert_clean(&bed, &id);
}

/// The sender is killed right after sending Commit: its freeze guard
/// neither thaws nor kills the source until the destination says; the
/// destination committed, so the guard removes the source.
#[test]
fn fence_sender_killed_after_commit_is_settled_by_its_guard() {
    let Some(bed) = testbed("fsk") else { return };
    let (src, id, token) = start_counter(&bed, "fs");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &[], &[]).unwrap();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_FAILPOINTS", "sender-after-commit=exit")]).unwrap();
    assert_ne!(sent.code, Some(0), "{}", sent.stderr);
    wait_for(Duration::from_secs(30), || (!bed.src_runc.exists(&id).unwrap_or(true)).then_some(()))
        .expect("the guard did not remove the source after the destination committed");
    let (_, _, dst_moves) = watch.finish("sender killed after commit");
    assert!(dst_moves > 0);
    assert_destination_runs(&bed, &id, &token);
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    remove_destination_copy(&bed, &id);
    assert_clean(&bed, &id);
}

/// The sender dies after journalling its decision to commit but before
/// the Commit left: the destination never hears it, removes its stopped
/// copy, and the guard, told so, thaws the source.
#[test]
fn fence_sender_killed_before_its_commit_left_is_rolled_back_by_its_guard() {
    let Some(bed) = testbed("fsb") else { return };
    let (src, id, token) = start_counter(&bed, "fb");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &[], &[]).unwrap();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_FAILPOINTS", "sender-after-commit-journalled=exit")]).unwrap();
    assert_ne!(sent.code, Some(0), "{}", sent.stderr);
    wait_for(Duration::from_secs(30), || (frozen_state(&bed, &id) == "THAWED").then_some(()))
        .expect("the guard did not thaw the source after the destination aborted");
    let (_, _, dst_moves) = watch.finish("sender killed before its commit left");
    assert_eq!(dst_moves, 0, "the destination's copy ran without a Commit");
    assert_only_source_runs(&bed, &src, &token);
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    assert_clean(&bed, &id);
}

/// The link is cut after the destination took the Commit and before its
/// acknowledgement arrives, and restored seconds later: the sender, in
/// doubt with the source frozen, asks again until the destination answers,
/// then removes the source.
#[test]
fn fence_link_cut_after_commit_is_settled_when_it_returns() {
    let Some(bed) = testbed("flc") else { return };
    let (src, id, token) = start_counter(&bed, "fc");
    let port = port();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let (mut receiver, mut sender) = cut_after_commit(&bed, &id, port, "3");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(frozen_state(&bed, &id), "FROZEN", "the source ran while the outcome was unknown");
    bed.restore_link();
    assert_eq!(sender.wait(Duration::from_secs(60)), Some(0), "{}", sender.stderr());
    let (_, _, dst_moves) = watch.finish("link cut after commit");
    assert!(dst_moves > 0);
    assert_destination_runs(&bed, &id, &token);
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    remove_destination_copy(&bed, &id);
    assert_clean(&bed, &id);
}

/// The link is cut after the destination restored (stopped) and before
/// the Commit reaches it: the destination times out and removes its copy;
/// the sender, in doubt, learns that once the link returns and thaws.
#[test]
fn fence_link_cut_before_commit_arrives_rolls_back_when_it_returns() {
    let Some(bed) = testbed("flb") else { return };
    let (src, id, token) = start_counter(&bed, "fk");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--timeout", "3"], &[]).unwrap();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let mut cmd = bed.send_command(&id, port, &["--timeout", "3", "--in-doubt-timeout", "60"]);
    cmd.env("CTMIGRATE_FAILPOINTS", "sender-before-commit=sleep:2000");
    let mut sender = ChildProcess::spawn(cmd).unwrap();
    assert!(sender.reached_phase("commit", Duration::from_secs(60)), "the sender never reached the commit");
    bed.cut_link().unwrap();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(frozen_state(&bed, &id), "FROZEN", "the source ran while the outcome was unknown");
    assert!(!bed.dst_runc.exists(&id).unwrap(), "the destination kept its copy without a Commit");
    bed.restore_link();
    assert_eq!(sender.wait(Duration::from_secs(60)), Some(4), "{}", sender.stderr());
    let (_, _, dst_moves) = watch.finish("link cut before commit");
    assert_eq!(dst_moves, 0);
    assert_only_source_runs(&bed, &src, &token);
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    assert_clean(&bed, &id);
}

/// The sender is killed while in doubt (the link cut after its Commit):
/// its guard takes over asking, with the source still frozen, and once the
/// link returns removes the source, the destination having committed.
#[test]
fn fence_sender_killed_while_in_doubt_is_settled_by_its_guard() {
    let Some(bed) = testbed("fsd") else { return };
    let (src, id, token) = start_counter(&bed, "fd");
    let port = port();
    let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
    let (mut receiver, mut sender) = cut_after_commit(&bed, &id, port, "2");
    // In doubt: the sender says so, then dies.
    assert!(
        sender.wait_until(Duration::from_secs(30), |e| e["event"] == "warning" && e["message"].as_str().unwrap_or("").contains("in doubt")),
        "the sender never reported being in doubt"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sender.child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = sender.wait(Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(frozen_state(&bed, &id), "FROZEN", "the source ran while the outcome was unknown");
    bed.restore_link();
    wait_for(Duration::from_secs(60), || (!bed.src_runc.exists(&id).unwrap_or(true)).then_some(()))
        .expect("the guard did not settle the migration once the destination answered");
    let (_, _, dst_moves) = watch.finish("sender killed in doubt");
    assert!(dst_moves > 0);
    assert_destination_runs(&bed, &id, &token);
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    remove_destination_copy(&bed, &id);
    assert_clean(&bed, &id);
}
