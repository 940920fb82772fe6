//! Stop-copy migrations between two network-namespace hosts over TCP, and
//! every failure path: each test injects one failure and checks that the
//! source keeps running and the destination is left clean.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn counter_keeps_counting_from_its_value_after_migration() {
    let Some(bed) = testbed("cnt") else { return };
    let id = format!("counter-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, before) = counter_at_least(&src.rootfs(), 20);

    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &["--dest-id", &format!("{id}-moved")], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "send failed: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());

    let result = sent.result().expect("a result event");
    assert_eq!(result["ok"], true);
    assert_eq!(result["source_state"], "migrated");
    for field in ["frozen_ms", "total_ms", "bytes_sent", "bytes_raw"] {
        assert!(result[field].as_u64().is_some(), "result lacks {field}: {result}");
    }
    assert!(result["bytes_sent"].as_u64().unwrap() > 0);

    // Source gone, destination managed by runc under the new id.
    assert!(!bed.src_runc.exists(&id).unwrap(), "source container still exists");
    let dst = bed.dst_container(&format!("{id}-moved"));
    let state = dst.runc.running(&dst.id).expect("destination container runs under runc");
    assert!(state.bundle.starts_with(bed.dst_bundles()));
    assert!(!dst.bundle.join(".ctmigrate-incomplete").exists());

    // Same token (not restarted), counting on from where it was.
    let (tok_now, first) = read_counter(&dst.rootfs()).expect("counter on the destination");
    assert_eq!(tok_now, token);
    assert!(first >= before, "counter went back from {before} to {first}");
    assert_counting_on(&dst.rootfs(), &token, first);

    // runc manages it: kill and delete work.
    dst.runc.kill(&dst.id, "KILL").unwrap();
    wait_for(Duration::from_secs(5), || (dst.runc.state(&dst.id).ok()?.status == "stopped").then_some(()));
    dst.runc.delete_force(&dst.id).unwrap();
    assert!(!dst.runc.exists(&dst.id).unwrap());
}

#[test]
fn pattern_fixture_of_256_mib_arrives_intact() {
    let Some(bed) = testbed("pat") else { return };
    let id = format!("pattern-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Pattern { mib: 256, dirty_kib_per_s: 1024 }).unwrap();
    let before = wait_for(Duration::from_secs(30), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 2))
        .expect("pattern fixture never completed two passes");
    assert!(before.ok, "{}", before.line);

    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "send failed: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(60)), Some(0), "receiver: {}", receiver.stderr());
    let result = sent.result().unwrap();
    assert!(
        result["image_bytes"].as_u64().unwrap() >= 256 << 20,
        "images smaller than the fixture's memory: {result}"
    );
    // Stop-copy: CRIU handed every page over its page-server socket; none
    // was written to the source host's images directory and read back.
    let final_bytes = result["final_bytes"].as_u64().unwrap();
    assert!(final_bytes >= 256 << 20, "{result}");
    assert_eq!(result["final_relayed_bytes"].as_u64(), Some(final_bytes), "pages staged on the source: {result}");

    let dst = bed.dst_container(&id);
    let after = wait_for(Duration::from_secs(30), || {
        read_pattern_status(&dst.rootfs()).filter(|s| s.passes >= before.passes + 2)
    })
    .expect("the fixture did not go on verifying after migration");
    assert_eq!(after.token, before.token, "the fixture restarted");
    assert!(after.ok, "memory corrupted by migration: {}", after.line);
}

#[test]
fn receiver_killed_mid_transfer_leaves_source_running_and_destination_clean() {
    let Some(bed) = testbed("kil") else { return };
    let id = format!("kill-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);

    let port = port();
    // The receiver stalls after its first image chunk; the test kills it
    // there with SIGKILL, so it can clean nothing up itself.
    let mut receiver = bed
        .spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-during-images=sleep:60000")])
        .unwrap();
    let mut sender = migration_testbed::ChildProcess::spawn(bed.send_command(&id, port, &["--timeout", "10"])).unwrap();
    receiver.wait_for_event("phase", Duration::from_secs(20)).unwrap();
    // Wait until the receiver holds image data, i.e. the source is frozen
    // and dumped, then kill it.
    wait_for(Duration::from_secs(20), || (frozen_state(&bed, &id) == "FROZEN").then_some(()))
        .expect("the source never froze");
    std::thread::sleep(Duration::from_millis(500));
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();

    assert_eq!(sender.wait(Duration::from_secs(60)), Some(4), "sender: {}", sender.stderr());
    let result = sender.result().expect("sender result").clone();
    assert_eq!(result["ok"], false);
    assert_eq!(result["source_state"], "running");

    // Source thawed and counting with its original token.
    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let (_, now) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), &token, now);

    // A killed receiver cannot clean up; the next receiver start does.
    let mut next = bed.spawn_receiver(port + 100, &["--once"], &[]).unwrap();
    next.child.kill().unwrap();
    let _ = next.child.wait();
    assert_clean(&bed, &id);
}

/// A migration whose stream `failpoint` damages after the freeze: both
/// sides stop with `reason`, the source resumes, nothing is left.
fn damaged_stream_is_refused(tag: &str, failpoint: &str, reason: &str) {
    let Some(bed) = testbed(tag) else { return };
    let id = format!("damaged-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);

    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_FAILPOINTS", &format!("{failpoint}=corrupt"))]).unwrap();
    assert_eq!(sent.code, Some(4), "expected rollback, got: {}", sent.stderr);
    assert!(sent.stderr.contains(reason), "the sender should report the receiver's reason: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(4));
    let rr = receiver.result().expect("receiver result");
    assert!(rr["error"].as_str().unwrap().contains(reason), "{rr}");

    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let (_, now) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), &token, now);
    assert_clean(&bed, &id);
}

#[test]
fn corrupted_chunk_is_refused_and_source_resumes() {
    // Altered after its checksum was taken: the frame check catches it.
    damaged_stream_is_refused("cor", "sender-corrupt-image", "checksum mismatch");
}

#[test]
fn a_byte_flipped_on_the_wire_is_refused_and_source_resumes() {
    // Altered inside a sealed TLS record: its authentication catches it.
    damaged_stream_is_refused("wir", "sender-corrupt-wire", "failed authentication");
}

#[test]
fn destination_id_taken_is_refused_before_the_source_freezes() {
    let Some(bed) = testbed("tak") else { return };
    let id = format!("taken-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    // Another container already runs under the id on the destination.
    let occupant_bundle = bed.dir.join("occupant");
    std::fs::create_dir_all(&occupant_bundle).unwrap();
    migration_testbed::build_bundle(&bed.runc_binary, &occupant_bundle, &Workload::Counter).unwrap();
    let occupant = migration_testbed::FixtureContainer::start(bed.dst_runc.clone(), &id, &occupant_bundle).unwrap();

    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(3), "expected a refusal before anything was touched: {}", sent.stderr);
    assert!(sent.stderr.contains("already exists on the destination"), "{}", sent.stderr);
    assert_eq!(sent.stderr.trim().lines().count(), 1, "one clear line: {}", sent.stderr);
    assert_eq!(sent.result().unwrap()["source_state"], "untouched");
    // Never frozen: no freeze phase was reached.
    assert!(!sent.events.iter().any(|e| e["phase"] == "freeze"), "the source was frozen");
    assert_eq!(receiver.wait(Duration::from_secs(10)), Some(3));

    let (_, now) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), &token, now);
    // The occupant is untouched, nothing else was created.
    assert_eq!(occupant.runc.running(&id).unwrap().bundle, occupant_bundle);
    assert!(!bed.dst_bundles().join(&id).exists());
}

#[test]
fn bad_input_gets_one_clear_line_and_touches_nothing() {
    let Some(bed) = testbed("bad") else { return };
    let id = format!("bad-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    counter_at_least(&src.rootfs(), 3);
    let port = port();

    // Wrong container id.
    let r = bed.run_sender("no-such-container", port, &[], &[]).unwrap();
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);

    // Unreachable destination (nothing listens).
    let r = bed.run_sender(&id, port, &["--timeout", "3"], &[]).unwrap();
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("cannot reach the destination"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert_eq!(frozen_state(&bed, &id), "THAWED");

    // Malformed destination: a usage error.
    let r = bed.run_sender(&id, port, &[], &[]).map(|_| ()).and_then(|_| {
        migration_testbed::CommandResult::run({
            let mut c = std::process::Command::new(EXE);
            c.args(["send", &id, "--to", "http://x:1"]);
            c
        })
    });
    let r = r.unwrap();
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("expected tcp://HOST:PORT"), "{}", r.stderr);

    // A stopped container.
    bed.src_runc.kill(&id, "KILL").unwrap();
    wait_for(Duration::from_secs(5), || (bed.src_runc.state(&id).ok()?.status == "stopped").then_some(()))
        .expect("container did not stop");
    let r = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.contains("not running"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert_eq!(bed.src_runc.state(&id).unwrap().status, "stopped", "the stopped container was changed");
    assert_clean(&bed, &id);
}

#[test]
fn validate_json_passes() {
    // validate builds its own testbed; this only gates on prerequisites.
    let Some(_gate) = testbed("vgt") else { return };
    let r = migration_testbed::CommandResult::run({
        let mut c = std::process::Command::new(EXE);
        c.args(["validate", "--json"]);
        c
    })
    .unwrap();
    assert_eq!(r.code, Some(0), "validate failed: {}", r.stderr);
    let result = r.result().expect("validate prints a result event");
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["frozen_ms"].as_u64().is_some());
}
