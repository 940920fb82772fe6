//! Pre-copy. On a kernel without soft-dirty tracking (this project's CI
//! hosts), `auto` falls back to stop-copy and `precopy` is refused before the
//! container is touched. The pre-copy migrations themselves run in a qemu
//! guest booting Debian's kernel, which has soft-dirty:
//! `precopy_suite_in_soft_dirty_guest` boots it and runs this same test
//! binary's `guest_*` tests inside (they are `#[ignore]`d on the host).

mod common;
#[path = "common/vm.rs"]
mod vm;

use std::time::Duration;

use common::*;

fn in_guest() -> bool {
    std::env::var("CTMIGRATE_IN_GUEST").as_deref() == Ok("1")
}

/// Whether CRIU can track memory changes on this kernel, per `ctmigrate check`.
fn kernel_has_soft_dirty() -> bool {
    let r = migration_testbed::CommandResult::run({
        let mut c = std::process::Command::new(EXE);
        c.args(["check", "--json"]);
        c
    })
    .unwrap();
    let report = r.events.iter().find(|e| e["event"] == "check").expect("check --json prints its report");
    let item = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "dirty-tracking").cloned().unwrap();
    item["ok"].as_bool().unwrap()
}

/// `auto` picks pre-copy where the kernel tracks dirty memory (the guest)
/// and falls back to stop-copy, saying why, where it does not (the host).
#[test]
fn auto_mode_picks_precopy_only_with_soft_dirty_and_says_why_not() {
    let Some(bed) = testbed("aut") else { return };
    let soft_dirty = kernel_has_soft_dirty();
    let (src, id, token) = {
        let id = format!("auto-{}", bed.tag);
        let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
        let (token, _) = counter_at_least(&src.rootfs(), 5);
        (src, id, token)
    };
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &["--mode", "auto", "--timeout", "20"], &[]).unwrap();
    if sent.code != Some(0) {
        let _ = receiver.wait(Duration::from_secs(30));
        panic!("send failed: {}\nsender events: {:?}\nreceiver events: {:?}\nreceiver stderr: {}", sent.stderr, sent.events, receiver.events, receiver.stderr());
    }
    let result = sent.result().unwrap();
    let start = sent.events.iter().find(|e| e["event"] == "start").unwrap();
    if soft_dirty {
        assert_eq!(result["mode"], "precopy", "{result}");
        assert!(result["mode_reason"].is_null());
        assert!(!result["rounds"].as_array().unwrap().is_empty());
    } else {
        assert_eq!(result["mode"], "stop-copy");
        assert!(result["mode_reason"].as_str().unwrap().contains("CONFIG_MEM_SOFT_DIRTY"), "{result}");
        assert_eq!(start["mode"], "stop-copy");
        assert!(start["mode_reason"].is_string());
        // One line says so on stderr.
        assert_eq!(sent.stderr.lines().filter(|l| l.contains("CONFIG_MEM_SOFT_DIRTY")).count(), 0, "JSON mode keeps stderr quiet");
    }
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0));
    drop(src);
    let dst = bed.dst_container(&id);
    let (_, n) = read_counter(&dst.rootfs()).unwrap();
    assert_counting_on(&dst.rootfs(), &token, n);
}

#[test]
fn precopy_mode_without_soft_dirty_is_refused_before_touching_the_container() {
    let Some(bed) = testbed("pcr") else { return };
    if kernel_has_soft_dirty() {
        assert!(in_guest(), "only the test guest is expected to have soft-dirty");
        return;
    }
    let id = format!("refuse-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &["--mode", "precopy"], &[]).unwrap();
    assert_eq!(sent.code, Some(3), "{}", sent.stderr);
    assert!(sent.stderr.contains("CONFIG_MEM_SOFT_DIRTY"), "the kernel option must be named: {}", sent.stderr);
    assert_eq!(sent.stderr.trim().lines().count(), 1, "{}", sent.stderr);
    assert!(!sent.events.iter().any(|e| e["event"] == "phase" && e["phase"] != "preflight"), "{:?}", sent.events);
    // Refused before connecting: the receiver is still waiting.
    assert!(receiver.child.try_wait().unwrap().is_none());
    let (_, n) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), &token, n);
    assert_eq!(frozen_state(&bed, &id), "THAWED");
    assert_clean(&bed, &id);
}

/// The guest tests, by name; each must report `ok` from inside the guest.
const GUEST_TESTS: &[&str] = &[
    "guest_pattern_fixture_migrates_with_shrinking_precopy_rounds",
    "guest_destination_killed_between_rounds_leaves_the_source_running",
    "guest_hybrid_runs_the_copy_before_the_last_dirty_pages_arrive",
    "auto_mode_picks_precopy_only_with_soft_dirty_and_says_why_not",
];

#[test]
fn precopy_suite_in_soft_dirty_guest() {
    if in_guest() {
        return; // this is the launcher; the guest runs the tests it names
    }
    let Some(_gate) = testbed("vmg") else { return };
    if let Some(why) = vm::missing() {
        if std::env::var("CTMIGRATE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("the pre-copy guest cannot run: {why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut command = format!("{} --include-ignored --test-threads=1 --exact", exe.display());
    let only = std::env::var("CTMIGRATE_GUEST_TESTS").ok();
    for t in GUEST_TESTS.iter().filter(|t| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == **t))) {
        command.push(' ');
        command.push_str(t);
    }
    let run = vm::run_in_guest(&command, 3072, Duration::from_secs(600));
    eprintln!("--- guest output ({:.0} s) ---\n{}", run.elapsed.as_secs_f64(), run.output);
    let console_tail: String = run.console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert_eq!(run.exit_code, Some(0), "guest tests failed; console:\n{console_tail}");
    for t in GUEST_TESTS.iter().filter(|t| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == **t))) {
        assert!(run.output.contains(&format!("test {t} ... ok")), "{t} did not pass in the guest");
    }
}

fn require_guest() -> Testbed {
    assert!(in_guest(), "run by precopy_suite_in_soft_dirty_guest, inside the soft-dirty guest");
    assert!(kernel_has_soft_dirty(), "the guest kernel must track dirty memory");
    testbed("gst").expect("prerequisites are required in the guest")
}

#[test]
#[ignore = "needs a soft-dirty kernel: run inside the guest by precopy_suite_in_soft_dirty_guest"]
fn guest_pattern_fixture_migrates_with_shrinking_precopy_rounds() {
    let bed = require_guest();
    let id = format!("precopy-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Pattern { mib: 256, dirty_kib_per_s: 1024 }).unwrap();
    let before = wait_for(Duration::from_secs(180), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1))
        .expect("the fixture never verified its memory");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--timeout", "300"], &[]).unwrap();
    let sent = bed.run_sender(&id, port, &["--mode", "precopy", "--timeout", "300"], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "{}\nreceiver: {}", sent.stderr, receiver.stderr());
    assert_eq!(receiver.wait(Duration::from_secs(120)), Some(0), "{}", receiver.stderr());

    let result = sent.result().unwrap().clone();
    eprintln!("result: {result}");
    assert_eq!(result["mode"], "precopy");
    let rounds = result["rounds"].as_array().expect("rounds in the result");
    assert!(rounds.len() >= 2, "at least 2 pre-copy rounds: {rounds:?}");
    assert!(result["stop_reason"].is_string());
    let first = rounds[0]["bytes"].as_u64().unwrap();
    let final_bytes = result["final_bytes"].as_u64().unwrap();
    assert!(first >= 256 << 20, "the first round copies all memory: {first}");
    assert!(final_bytes * 4 < first, "final dump {final_bytes} bytes is not under a quarter of round 1's {first}");
    assert_eq!(sent.events.iter().filter(|e| e["event"] == "round").count(), rounds.len());
    // The destination folded each later round into round 1 (the fixture
    // maps no new memory), so the restore read one image, not a chain; the
    // data check below shows the folded pages are the newest.
    let folds: Vec<&serde_json::Value> = receiver.events.iter().filter(|e| e["event"] == "round-fold").collect();
    eprintln!("folds: {folds:?}");
    assert_eq!(folds.len(), rounds.len() - 1, "{folds:?}");
    assert!(folds.iter().all(|f| f["folded_bytes"].as_u64().is_some()), "{folds:?}");

    let dst = bed.dst_container(&id);
    let after = wait_for(Duration::from_secs(180), || {
        read_pattern_status(&dst.rootfs()).filter(|s| s.passes > before.passes)
    })
    .expect("the fixture did not go on verifying after migration");
    assert_eq!(after.token, before.token, "the fixture restarted");
    assert!(after.ok, "memory corrupted: {}", after.line);
}

#[test]
#[ignore = "needs a soft-dirty kernel: run inside the guest by precopy_suite_in_soft_dirty_guest"]
fn guest_destination_killed_between_rounds_leaves_the_source_running() {
    let bed = require_guest();
    let id = format!("between-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    let port = port();
    // The receiver dies (as if killed) after verifying round 1.
    let mut receiver =
        bed.spawn_receiver(port, &["--once"], &[("CTMIGRATE_FAILPOINTS", "receiver-after-round=exit")]).unwrap();
    let sent = bed.run_sender(&id, port, &["--mode", "precopy"], &[]).unwrap();
    let _ = receiver.wait(Duration::from_secs(30));
    // Never frozen: exit 3 with the source untouched (not 4, "failed after
    // the source was frozen"); the state machine says so.
    assert_eq!(sent.code, Some(3), "{}", sent.stderr);
    assert_eq!(sent.result().unwrap()["source_state"], "untouched");
    // It failed where it was meant to: round 1 was sent and verified, and
    // then the receiver was gone.
    // (A receiver that dies with our data unread answers with a reset.)
    assert!(
        sent.stderr.contains("peer closed the connection") || sent.stderr.contains("reset by peer"),
        "{}",
        sent.stderr
    );
    assert!(receiver.events.iter().any(|e| e["event"] == "phase" && e["phase"] == "transfer"));
    assert!(!sent.stderr.contains("CRIU"), "CRIU failed instead: {}", sent.stderr);
    assert!(!sent.events.iter().any(|e| e["phase"] == "freeze"), "the source was frozen");
    assert_eq!(frozen_state(&bed, &id), "THAWED");
    let (_, n) = read_counter(&src.rootfs()).unwrap();
    assert_counting_on(&src.rootfs(), &token, n);
    // The dead receiver's partial chain goes at the next receiver start.
    let mut next = bed.spawn_receiver(port + 100, &[], &[]).unwrap();
    next.child.kill().unwrap();
    let _ = next.child.wait();
    assert_clean(&bed, &id);
}

/// Benchmark (not run by the test suite): frozen time of pre-copy against
/// stop-copy for the 256 MiB pattern fixture dirtying 1 MiB/s, interleaved,
/// in the soft-dirty guest. Prints one `BENCH {json}` line. Run with
/// `cargo test --release --test precopy -- --ignored bench_precopy_vs_stop_copy_in_guest --nocapture`.
#[test]
#[ignore = "needs a soft-dirty kernel: run inside the guest by precopy_suite_in_soft_dirty_guest"]
fn guest_hybrid_runs_the_copy_before_the_last_dirty_pages_arrive() {
    let bed = require_guest();
    let id = format!("hybrid-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Pattern { mib: 256, dirty_kib_per_s: 1024 }).unwrap();
    let before = wait_for(Duration::from_secs(180), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1))
        .expect("the fixture never verified its memory");
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--timeout", "300"], &[]).unwrap();
    // The emulated guest is slow: a long lease.
    let sent = bed.run_sender(&id, port, &["--mode", "hybrid", "--timeout", "300", "--postcopy-lease", "30000"], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "{}\nreceiver: {}", sent.stderr, receiver.stderr());
    assert_eq!(receiver.wait(Duration::from_secs(120)), Some(0), "{}", receiver.stderr());
    let result = sent.result().unwrap().clone();
    eprintln!("result: {result}");
    assert_eq!(result["mode"], "hybrid");
    let rounds = result["rounds"].as_array().expect("rounds in the result");
    assert!(!rounds.is_empty(), "hybrid starts with pre-copy rounds: {result}");
    let first = rounds[0]["bytes"].as_u64().unwrap();
    assert!(first >= 256 << 20, "the first round copies all memory: {first}");
    // What the rounds left came after the restore, on demand or in the
    // background: far less than the whole memory.
    let pages = result["postcopy"]["pages"].as_u64().expect("post-copy figures in the result");
    assert!(pages > 0 && pages * 4096 * 4 < first, "{pages} pages after the restore, round 1 had {first} bytes");

    let dst = bed.dst_container(&id);
    let after = wait_for(Duration::from_secs(180), || read_pattern_status(&dst.rootfs()).filter(|s| s.passes > before.passes))
        .expect("the fixture did not go on verifying after migration");
    assert_eq!(after.token, before.token, "the fixture restarted");
    assert!(after.ok, "memory corrupted: {}", after.line);
}

#[test]
#[ignore = "benchmark: run by hand, see docs/performance.md"]
fn bench_precopy_vs_stop_copy_in_guest() {
    assert!(vm::missing().is_none(), "{:?}", vm::missing());
    let exe = std::env::current_exe().unwrap();
    // CTMIGRATE_BENCH_RUNS, if set, reaches the guest (for quick looks);
    // guest_bench_frozen_time has the default.
    let runs = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|r| r.parse::<u32>().ok());
    let runs = runs.map(|r| format!("CTMIGRATE_BENCH_RUNS={r} ")).unwrap_or_default();
    let command = format!("{runs}{} --include-ignored --exact --nocapture guest_bench_frozen_time", exe.display());
    let run = vm::run_in_guest(&command, 3072, Duration::from_secs(1800));
    let line = run.output.lines().find(|l| l.starts_with("BENCH ")).unwrap_or_else(|| panic!("no figures:\n{}", run.output));
    println!("{line}");
}

#[test]
#[ignore = "benchmark half that runs inside the guest"]
fn guest_bench_frozen_time() {
    let bed = require_guest();
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let mut frozen: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    // Where the frozen time goes, for the last run of each mode: ms from
    // the freeze to the start of each later phase.
    let mut phases: std::collections::BTreeMap<&str, serde_json::Value> = Default::default();
    let mut finals: Vec<u64> = Vec::new();
    // Each run's frozen time and its phases, in run order.
    let mut by_run: std::collections::BTreeMap<&str, Vec<serde_json::Value>> = Default::default();
    for run in 0..runs {
        for mode in ["stop-copy", "precopy"] {
            let id = format!("bench-{mode}-{run}-{}", bed.tag);
            let src = bed.start_fixture(&id, &Workload::Pattern { mib: 256, dirty_kib_per_s: 1024 }).unwrap();
            wait_for(Duration::from_secs(180), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 1)).unwrap();
            let port = port();
            let mut receiver = bed.spawn_receiver(port, &["--once", "--timeout", "300"], &[]).unwrap();
            let sent = bed
                .run_sender(&id, port, &["--mode", mode, "--timeout", "300", "--dest-id", &format!("{id}-d")], &[])
                .unwrap();
            assert_eq!(sent.code, Some(0), "{}", sent.stderr);
            assert_eq!(receiver.wait(Duration::from_secs(120)), Some(0));
            let r = sent.result().unwrap();
            frozen.entry(mode).or_default().push(r["frozen_ms"].as_u64().unwrap());
            by_run.entry(mode).or_default().push(serde_json::json!({"frozen_ms": r["frozen_ms"], "phases": r["frozen_phases"], "rounds": r["rounds"].as_array().map_or(0, |a| a.len())}));
            let at = |p: &str| sent.events.iter().find(|e| e["phase"] == p).and_then(|e| e["elapsed_ms"].as_u64());
            let freeze = at("freeze").unwrap();
            phases.insert(
                mode,
                serde_json::json!({
                    "rootfs_delta": at("rootfs-delta").map(|t| t - freeze),
                    "dump": at("dump").map(|t| t - freeze),
                    "transfer_rest": at("transfer").map(|t| t - freeze),
                    "restore": at("restore").map(|t| t - freeze),
                    "restored_at": r["frozen_ms"],
                    "frozen_phases": r["frozen_phases"],
                    "rounds": r["rounds"],
                }),
            );
            if mode == "precopy" {
                finals.push(r["final_bytes"].as_u64().unwrap());
            }
            drop(src);
            migration_testbed::force_remove(&bed.dst_runc, &format!("{id}-d"));
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let stop = median(frozen.get_mut("stop-copy").unwrap());
    let pre = median(frozen.get_mut("precopy").unwrap());
    let figures = serde_json::json!({
        "fixture": "pattern 256 MiB, 1 MiB/s dirtied",
        "runs": runs,
        "ms_after_freeze_last_run": phases,
        "by_run": by_run,
        "frozen_ms": frozen,
        "median_frozen_ms": {"stop-copy": stop, "precopy": pre},
        "precopy_final_dump_bytes": finals,
        "ratio_precopy_to_stop_copy": (pre as f64 / stop as f64 * 1000.0).round() / 1000.0,
    });
    println!("BENCH {figures}");
}
