//! Benchmarks run by hand (`#[ignore]`d): see docs/performance.md.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The floor for stop-copy: `runc checkpoint` to tmpfs and `runc restore`
/// from it on the same host, no network. Returns the wall time from the
/// start of the checkpoint to the end of the restore (the container runs
/// in neither).
fn floor_ms(bed: &Testbed, mib: u64, n: usize) -> u64 {
    let id = format!("floor{mib}-{n}-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Pattern { mib, dirty_kib_per_s: 0 }).unwrap();
    wait_for(Duration::from_secs(60), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1)).unwrap();
    // The restored copy needs its own bundle and cgroup, made beforehand.
    let copy = bed.dir.join(format!("{id}-restored"));
    assert!(Command::new("cp").arg("-a").arg(&src.bundle).arg(&copy).status().unwrap().success());
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(copy.join("config.json")).unwrap()).unwrap();
    cfg["linux"]["cgroupsPath"] = format!("{}/{id}-r", bed.cgroup_parent).into();
    std::fs::write(copy.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let images = bed.dir.join(format!("{id}-images"));
    let runc = |root: &std::path::Path, args: &[&str]| {
        let st = Command::new(&bed.runc_binary)
            .arg("--root")
            .arg(root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "runc {args:?} failed");
    };
    let started = Instant::now();
    runc(&bed.src_runc.root, &["checkpoint", "--image-path", images.to_str().unwrap(), &id]);
    runc(&bed.dst_runc.root, &["restore", "-d", "--image-path", images.to_str().unwrap(), "--bundle", copy.to_str().unwrap(), &format!("{id}-r")]);
    let ms = started.elapsed().as_millis() as u64;
    let restored = bed.dst_container(&format!("{id}-r"));
    restored.runc.running(&restored.id).expect("the floor's restored copy runs");
    drop(restored);
    let _ = std::fs::remove_dir_all(&images);
    ms
}

fn ctmigrate_ms(bed: &Testbed, mib: u64, n: usize, port: u16) -> u64 {
    let id = format!("ctm{mib}-{n}-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Pattern { mib, dirty_kib_per_s: 0 }).unwrap();
    wait_for(Duration::from_secs(60), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1)).unwrap();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &["--mode", "stop-copy", "--dest-id", &format!("{id}-d")], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(120)), Some(0));
    let ms = sent.result().unwrap()["frozen_ms"].as_u64().unwrap();
    drop(bed.dst_container(&format!("{id}-d")));
    ms
}

/// ctmigrate's stop-copy frozen time against the floor, for 64 and 512 MiB
/// of incompressible memory, interleaved, three times each.
/// `cargo test --release --test bench -- --ignored bench_stop_copy_against_floor --nocapture`
#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_stop_copy_against_floor() {
    let bed = testbed("flo").expect("root prerequisites");
    let mut out = serde_json::Map::new();
    for mib in [64u64, 512] {
        let (mut floor, mut ours) = (Vec::new(), Vec::new());
        for n in 0..3 {
            floor.push(floor_ms(&bed, mib, n));
            ours.push(ctmigrate_ms(&bed, mib, n, port()));
        }
        let median = |v: &mut Vec<u64>| {
            v.sort();
            v[v.len() / 2]
        };
        let (f, o) = (median(&mut floor.clone()), median(&mut ours.clone()));
        out.insert(
            format!("{mib}MiB"),
            serde_json::json!({"floor_ms": floor, "ctmigrate_frozen_ms": ours, "median_ratio_to_floor": (o as f64 / f as f64 * 1000.0).round() / 1000.0}),
        );
    }
    println!("BENCH {}", serde_json::Value::Object(out));
}
