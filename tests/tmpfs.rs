//! A container's tmpfs mounts that are empty when it freezes (runc's
//! read-only masks over /proc/acpi and /sys/firmware, an unused /dev/shm)
//! are mounted anew on the destination, with the same options, instead of
//! archived by CRIU; a tmpfs with anything in it is carried by CRIU, its
//! contents intact. The receiver's own mounts do not outlive the migration.

mod common;


use common::*;

/// Mount or file system options, in order.
type Options = std::collections::BTreeMap<String, Option<String>>;

/// The mountinfo row (mount options, file system type, super options) of
/// the topmost mount at `mountpoint` in process `pid`'s view.
fn mount_row(pid: i32, mountpoint: &str) -> Option<(Options, String, Options)> {
    let mounts = container_runtime::procinfo::mountinfo(pid).unwrap();
    mounts.iter().rev().find(|m| m.mount_point == std::path::Path::new(mountpoint)).map(|m| {
        let sorted = |o: &std::collections::HashMap<String, Option<String>>| o.clone().into_iter().collect::<Options>();
        (sorted(&m.mount_options), m.fs_type.clone(), sorted(&m.super_options))
    })
}

fn made_anew(result: &serde_json::Value) -> Vec<String> {
    result["tmpfs_made_anew"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// Only this test bed's receiver counts: a run killed on the same machine
/// may have left its own (CI found one).
fn assert_no_receiver_tmpfs_left(bed: &Testbed) {
    use container_runtime::procinfo;
    let mounts = procinfo::own_mountinfo().unwrap();
    let ours = |m: &procinfo::MountInfo| {
        [procinfo::mount_point(m).to_string_lossy().into_owned(), m.root.clone()].iter().any(|f| f.contains(migration_engine::scratch::EMPTY_TMPFS_DIR))
    };
    let left: Vec<_> = mounts.iter().filter(|m| procinfo::lies_below(&procinfo::mount_point(m), &bed.dst_work()) && ours(m)).collect();
    assert!(left.is_empty(), "the receiver's tmpfs mounts stayed: {left:#?}");
}

#[test]
fn empty_tmpfs_are_mounted_anew_and_a_used_one_is_carried_by_criu() {
    let Some(bed) = testbed("tmp") else { return };

    // 1. Nothing in /dev/shm: it and the masks are made anew, alike.
    let id = format!("shm-empty-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    let src_pid = bed.src_runc.state(&id).unwrap().pid;
    let before: Vec<_> = ["/dev/shm", "/proc/acpi", "/sys/firmware"].iter().map(|m| mount_row(src_pid, m)).collect();
    let dest_id = format!("{id}-d");
    let result = migrate_ok(&bed, &id, &dest_id).result().unwrap().clone();
    let anew = made_anew(&result);
    for m in ["/dev/shm", "/proc/acpi", "/sys/firmware"] {
        assert!(anew.iter().any(|a| a == m), "{m} not made anew: {result}");
    }
    assert!(!anew.iter().any(|a| a == "/dev"), "/dev holds device nodes: {result}");
    let dst = bed.dst_container(&dest_id);
    let dst_pid = dst.runc.state(&dst.id).unwrap().pid;
    let after: Vec<_> = ["/dev/shm", "/proc/acpi", "/sys/firmware"].iter().map(|m| mount_row(dst_pid, m)).collect();
    // Same mount flags, type and file system options as on the source.
    assert_eq!(before, after);
    for m in ["dev/shm", "proc/acpi", "sys/firmware"] {
        let inside = std::path::Path::new("/proc").join(dst_pid.to_string()).join("root").join(m);
        assert_eq!(std::fs::read_dir(&inside).unwrap().count(), 0, "{m} is not empty");
    }
    let (_, now) = read_counter(&dst.rootfs()).unwrap();
    assert_counting_on(&dst.rootfs(), &token, now);
    assert_no_receiver_tmpfs_left(&bed);

    // 2. A file in /dev/shm: CRIU archives that tmpfs, and the file arrives.
    let id = format!("shm-used-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    counter_at_least(&src.rootfs(), 5);
    let src_pid = bed.src_runc.state(&id).unwrap().pid;
    std::fs::write(format!("/proc/{src_pid}/root/dev/shm/segment"), b"shared memory contents").unwrap();
    let dest_id = format!("{id}-d");
    let result = migrate_ok(&bed, &id, &dest_id).result().unwrap().clone();
    let anew = made_anew(&result);
    assert!(!anew.iter().any(|a| a == "/dev/shm"), "a used /dev/shm was made anew: {result}");
    assert!(anew.iter().any(|a| a == "/proc/acpi"), "{result}");
    let dst = bed.dst_container(&dest_id);
    let dst_pid = dst.runc.state(&dst.id).unwrap().pid;
    assert_eq!(std::fs::read(format!("/proc/{dst_pid}/root/dev/shm/segment")).unwrap(), b"shared memory contents");
    assert_no_receiver_tmpfs_left(&bed);
}
