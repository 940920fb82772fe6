//! The rootfs arrives exactly as it was when the source froze, or the
//! migration is refused (root, runc, CRIU).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use migration_testbed::{build_bundle, ChildProcess, FixtureContainer};

/// Everything the destination must reproduce, read independently of
/// ctmigrate's own code: per path, type, mode, owner, size, mtime, link
/// target, device, xattrs and a content hash; hard links as groups.
/// `moving`: files a running container rewrites (they may vanish between
/// the directory listing and their inspection), left out.
fn tree_of(root: &Path, skip_below: &[&str], moving: &[&str]) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name().into_iter().flatten() {
        let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
        if rel.as_os_str().is_empty() || skip_below.iter().any(|s| rel.starts_with(s) && rel != Path::new(s)) || moving.iter().any(|m| rel == Path::new(m)) {
            continue;
        }
        let m = e.path().symlink_metadata().unwrap();
        if m.file_type().is_socket() {
            continue;
        }
        let mut xattrs: Vec<String> = xattr::list(e.path())
            .unwrap()
            .map(|n| format!("{}={:?}", n.to_string_lossy(), xattr::get(e.path(), &n).unwrap()))
            .collect();
        xattrs.sort();
        let content = if m.is_file() {
            let bytes = std::fs::read(e.path()).unwrap();
            format!("{:x}", crc32c::crc32c(&bytes)) + &format!("/{}", bytes.len())
        } else if m.file_type().is_symlink() {
            std::fs::read_link(e.path()).unwrap().display().to_string()
        } else {
            String::new()
        };
        let link = if m.is_file() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_insert_with(|| rel.clone()).display().to_string()
        } else {
            String::new()
        };
        let mtime = if m.is_dir() { 0 } else { m.mtime() };
        out.insert(
            rel,
            format!("{:o} {}:{} {} {} rdev={} {} xattrs={:?} link={}", m.mode(), m.uid(), m.gid(), mtime, content, m.rdev(), m.size() * m.is_file() as u64, xattrs, link),
        );
    }
    out
}

fn assert_same_tree(src: &Path, dst: &Path) {
    // /dev is covered by runc's tmpfs in the container: not sent. The
    // counter goes on on the destination (CI once caught counter.tmp
    // between its listing and its inspection).
    let moving = ["counter", "counter.tmp"];
    let (a, b) = (tree_of(src, &["dev", "proc", "sys"], &moving), tree_of(dst, &["dev", "proc", "sys"], &moving));
    for (p, want) in &a {
        assert_eq!(b.get(p), Some(want), "{} differs on the destination", p.display());
    }
    for p in b.keys() {
        assert!(a.contains_key(p), "{} is on the destination only", p.display());
    }
}

/// A counter container whose rootfs also holds `extra`'s additions.
fn start_with(bed: &Testbed, id: &str, extra: impl FnOnce(&Path)) -> FixtureContainer {
    let bundle = bed.dir.join("src-bundles").join(id);
    std::fs::create_dir_all(&bundle).unwrap();
    build_bundle(&bed.runc_binary, &bundle, &Workload::Counter).unwrap();
    extra(&bundle.join("rootfs"));
    let c = FixtureContainer::start(bed.src_runc.clone(), id, &bundle).unwrap();
    counter_at_least(&c.rootfs(), 3);
    c
}

#[test]
fn rootfs_changed_while_the_running_pass_reads_it_arrives_as_frozen() {
    let Some(bed) = testbed("rfr") else { return };
    let id = format!("rfr-{}", bed.tag);
    let src = start_with(&bed, &id, |rootfs| {
        // 24 MiB that the running pass pauses in, a file to delete, a hard
        // link pair, a FIFO, a capability and a sparse file.
        let big: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(rootfs.join("big.bin"), &big).unwrap();
        std::fs::write(rootfs.join("victim"), "delete me").unwrap();
        std::fs::write(rootfs.join("bin/tool"), "tool").unwrap();
        std::fs::hard_link(rootfs.join("bin/tool"), rootfs.join("bin/tool-1.0")).unwrap();
        nix::unistd::mkfifo(&rootfs.join("tmp/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o620)).unwrap();
        let cap: [u8; 20] = [0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        xattr::set(rootfs.join("bin/tool"), "security.capability", &cap).unwrap();
        let f = std::fs::File::create(rootfs.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 32 << 20).unwrap();
        std::os::unix::fs::chown(rootfs.join("victim"), Some(4321), Some(4321)).unwrap();
    });
    let rootfs = src.rootfs();
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let mut cmd = bed.send_command(&id, port, &[]);
    cmd.env("CTMIGRATE_FAILPOINTS", "sender-rootfs-mid-file=sleep:3000");
    let mut sender = ChildProcess::spawn(cmd).unwrap();
    sender.wait_for_event("start", Duration::from_secs(20)).unwrap();
    // The sender is paused inside the first large file (big.bin): change
    // it where it has not read yet and where it has, delete a file it
    // has sent, make one it has passed.
    std::thread::sleep(Duration::from_millis(1500));
    let f = std::fs::OpenOptions::new().write(true).open(rootfs.join("big.bin")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"written during the pass", 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"and further on", 20 << 20).unwrap();
    drop(f);
    std::fs::remove_file(rootfs.join("victim")).unwrap();
    std::fs::write(rootfs.join("newcomer"), "new").unwrap();
    std::fs::write(rootfs.join("bin/tool-1.0"), "tool v2").unwrap();

    assert_eq!(sender.wait(Duration::from_secs(90)), Some(0), "send failed: {}", sender.stderr());
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());
    let result = sender.result().unwrap().clone();
    assert_eq!(result["rootfs_verified"], true, "{result}");
    let digest = result["rootfs"]["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 64);
    let audit = std::fs::read_to_string(bed.audit_log("dst")).unwrap();
    assert!(audit.contains(digest), "the receiver's audit log records the tree digest");
    let dst = bed.dst_container(&id);
    assert_same_tree(&rootfs, &dst.rootfs());
    let dst_root = dst.rootfs();
    assert!(!dst_root.join("victim").exists());
    assert_eq!(std::fs::metadata(dst_root.join("bin/tool")).unwrap().ino(), std::fs::metadata(dst_root.join("bin/tool-1.0")).unwrap().ino());
    assert!(std::fs::symlink_metadata(dst_root.join("tmp/fifo")).unwrap().file_type().is_fifo());
    assert!(std::fs::metadata(dst_root.join("sparse")).unwrap().blocks() < 1024, "the sparse file stays sparse");
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source is gone");
    let (token, n) = counter_at_least(&dst_root, 1);
    assert_counting_on(&dst_root, &token, n);
}

#[test]
fn rootfs_device_node_outside_dev_is_refused_before_the_freeze() {
    let Some(bed) = testbed("rdv") else { return };
    let id = format!("rdv-{}", bed.tag);
    let src = start_with(&bed, &id, |rootfs| {
        std::fs::create_dir_all(rootfs.join("opt")).unwrap();
        nix::sys::stat::mknod(&rootfs.join("opt/disk"), nix::sys::stat::SFlag::S_IFBLK, nix::sys::stat::Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(8, 0)).unwrap();
    });
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[]).unwrap();
    assert_eq!(sent.code, Some(3), "{}", sent.stderr);
    let lines: Vec<&str> = sent.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "one clear line: {}", sent.stderr);
    assert!(lines[0].contains("block device") && lines[0].contains("opt/disk (8:0)"), "{}", lines[0]);
    assert_eq!(sent.result().unwrap()["source_state"], "untouched");
    receiver.wait(Duration::from_secs(20));
    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let (token, n) = counter_at_least(&src.rootfs(), 1);
    assert_counting_on(&src.rootfs(), &token, n);
    assert_clean(&bed, &id);
}

#[test]
fn rootfs_digest_the_records_do_not_add_up_to_is_refused_before_restore() {
    let Some(bed) = testbed("rdg") else { return };
    let id = format!("rdg-{}", bed.tag);
    let src = start_with(&bed, &id, |_| {});
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &[], &[("CTMIGRATE_FAILPOINTS", "sender-rootfs-unsent-change=corrupt")]).unwrap();
    assert_eq!(sent.code, Some(4), "{}", sent.stderr);
    assert!(sent.stderr.contains("do not add up to the source's tree"), "{}", sent.stderr);
    assert_eq!(sent.result().unwrap()["rootfs_verified"], false);
    assert_ne!(receiver.wait(Duration::from_secs(30)), Some(0));
    assert_eq!(receiver.result().unwrap()["ok"], false);
    assert!(!bed.dst_runc.exists(&id).unwrap(), "nothing was restored");
    let (token, n) = counter_at_least(&src.rootfs(), 1);
    assert_counting_on(&src.rootfs(), &token, n);
    assert_clean(&bed, &id);
}

#[test]
fn rootfs_flock_held_before_is_held_after() {
    let Some(bed) = testbed("rlk") else { return };
    let id = format!("rlk-{}", bed.tag);
    let bundle = bed.dir.join("src-bundles").join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    build_bundle(&bed.runc_binary, &bundle, &Workload::Counter).unwrap();
    std::os::unix::fs::symlink("busybox", bundle.join("rootfs/bin/flock")).unwrap();
    let cfg_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    let script = format!("touch /lockfile; flock -x /lockfile sleep 100000 & {}", migration_testbed::COUNTER_SCRIPT);
    cfg["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let src = FixtureContainer::start(bed.src_runc.clone(), &id, &bundle).unwrap();
    counter_at_least(&src.rootfs(), 3);
    let lock_free = |runc: &container_runtime::Runc| {
        let st = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc.root)
            .args(["exec", &id, "/bin/flock", "-n", "-x", "/lockfile", "true"])
            .status()
            .unwrap();
        st.success()
    };
    assert!(!lock_free(&bed.src_runc), "the lock is held on the source");
    migrate_ok(&bed, &id, &id);
    assert!(!lock_free(&bed.dst_runc), "the lock is still held on the destination");
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source is gone");
}

/// Benchmark (not run by the suite): the frozen rootfs pass on a real
/// root filesystem. `CTMIGRATE_BENCH_ROOTFS` names a rootfs directory (the
/// Debian one tests/workloads.rs builds is under /var/cache/ctmigrate/rootfs);
/// it is copied. Two parts, one `BENCH {json}` line each:
/// 1. the frozen pass with inotify against the same pass comparing every
///    entry (the fallback, and what every pass did before), interleaved
///    on one copy of the tree, with a few files changed before each;
/// 2. whole migrations of an idle container from that rootfs: the frozen
///    pass's share of the frozen time, and the receiver's verification.
///
/// `CTMIGRATE_BENCH_ROOTFS=DIR cargo test --release --test rootfs -- --ignored bench_rootfs_frozen_pass --nocapture`
#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_rootfs_frozen_pass() {
    use migration_engine::rootfs::TreeSender;
    use migration_protocol::{CompressionMode, Compressor, FrameWriter, RootfsPhase};
    let Some(source) = std::env::var_os("CTMIGRATE_BENCH_ROOTFS") else {
        panic!("set CTMIGRATE_BENCH_ROOTFS to a root filesystem directory");
    };
    let bed = testbed("rbn").expect("root prerequisites");
    let runs = 5;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };

    // 1. The pass alone, inotify against comparing every entry.
    let copy = bed.dir.join("bench-rootfs");
    assert!(std::process::Command::new("cp").arg("-a").arg(&source).arg(&copy).status().unwrap().success());
    let hidden: std::collections::BTreeSet<PathBuf> = ["dev", "proc", "sys"].iter().map(PathBuf::from).collect();
    let mut tracked = TreeSender::new(&copy, hidden.clone());
    let mut walked = TreeSender::new(&copy, hidden);
    let mut out = FrameWriter::new(std::io::sink());
    let mut c = Compressor::new(CompressionMode::Never);
    let initial = tracked.initial_pass(&mut out, &mut c, &mut |_| {}).unwrap();
    walked.initial_pass(&mut out, &mut c, &mut |_| {}).unwrap();
    let (mut with_inotify, mut comparing) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // An idle service still writes a little: a log line, a pid file.
        std::fs::write(copy.join(format!("tmp/bench-{run}")), "x").unwrap();
        std::fs::write(copy.join("etc/hostname"), format!("bench-{run}\n")).unwrap();
        for (sender, times, baseline) in [(&mut tracked, &mut with_inotify, false), (&mut walked, &mut comparing, true)] {
            if baseline {
                sender.stop_tracking("benchmark baseline");
            }
            let t = std::time::Instant::now();
            let r = sender.delta_pass(&mut out, &mut c, RootfsPhase::Frozen).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert!(r.entries >= 2, "the changes were sent: {r:?}");
        }
    }
    let (a, b) = (median(with_inotify.clone()), median(comparing.clone()));
    println!(
        "BENCH {}",
        serde_json::json!({
            "part": "frozen pass",
            "entries": initial.entries,
            "inotify_ms": with_inotify,
            "compare_every_entry_ms": comparing,
            "median_inotify_ms": (a * 100.0).round() / 100.0,
            "median_compare_every_entry_ms": (b * 100.0).round() / 100.0,
            "ratio_inotify_to_compare": (a / b * 1000.0).round() / 1000.0,
        })
    );

    // 2. Whole migrations of an idle container.
    for run in 0..3 {
        let id = format!("rbn{run}-{}", bed.tag);
        let bundle = bed.dir.join("src-bundles").join(&id);
        std::fs::create_dir_all(&bundle).unwrap();
        build_bundle(&bed.runc_binary, &bundle, &Workload::Counter).unwrap();
        std::fs::remove_dir_all(bundle.join("rootfs")).unwrap();
        assert!(std::process::Command::new("cp").arg("-a").arg(&source).arg(bundle.join("rootfs")).status().unwrap().success());
        let cfg_path = bundle.join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        cfg["process"]["args"] = serde_json::json!(["/bin/sleep", "100000"]);
        std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let _c = FixtureContainer::start(bed.src_runc.clone(), &id, &bundle).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let port = port();
        let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
        let sent = bed.run_sender(&id, port, &["--dest-id", &id], &[]).unwrap();
        assert_eq!(sent.code, Some(0), "send failed: {}", sent.stderr);
        assert_eq!(receiver.wait(Duration::from_secs(60)), Some(0), "receiver: {}", receiver.stderr());
        let (r, rr) = (sent.result().unwrap(), receiver.result().unwrap());
        println!(
            "BENCH {}",
            serde_json::json!({
                "part": "migration",
                "run": run,
                "frozen_ms": r["frozen_ms"],
                "rootfs_delta_ms": r["frozen_phases"]["rootfs_delta_ms"],
                "frozen_entries": r["rootfs"]["frozen_entries"],
                "frozen_tracking": r["rootfs"]["frozen_tracking"],
                "entries": r["rootfs"]["entries"],
                "receiver_verify_ms": rr["rootfs"]["verify_ms"],
                "receiver_verify_wait_ms": rr["rootfs"]["verify_wait_ms"],
                "rootfs_verified": [r["rootfs_verified"].clone(), rr["rootfs_verified"].clone()],
            })
        );
        migration_testbed::force_remove(&bed.dst_runc, &id);
    }
}
