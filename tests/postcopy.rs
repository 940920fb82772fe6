//! Post-copy: the container runs on the destination before its memory has
//! arrived (the memory follows on demand and in the background, relayed
//! over the migration's connection), and every failure before the last
//! page ends with the destination's copy removed and the source thawed
//! with its memory, never two copies running.
//!
//! The pattern fixture's heartbeat file (`status.beat`, every 100 ms)
//! shows which copy runs; its passes verify every byte of its memory.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use migration_testbed::{read_pattern_beat, ChildProcess, FixtureContainer};

const MIB: u64 = 128;

/// Samples both copies' heartbeats every 20 ms: each sample is the beat
/// count and the time the beat file was written (its mtime; both copies
/// write on this one machine's clock). Two copies ran at once if both
/// advanced between the same two samples and the one that took over did
/// not beat only after the other's last beat, or if the first went on
/// after the second had started.
struct BeatWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<BeatSample>>>,
}

/// One heartbeat as read: its count and when it was written.
type Beat = (u64, std::time::SystemTime);
/// One sample of both heartbeats: the source's and the destination's.
type BeatSample = (Option<Beat>, Option<Beat>);

fn beat_at(rootfs: &Path) -> Option<Beat> {
    let written = std::fs::metadata(rootfs.join("status.beat")).and_then(|m| m.modified()).ok()?;
    read_pattern_beat(rootfs).map(|(_, n)| (n, written))
}

impl BeatWatch {
    fn start(bed: &Testbed, src_rootfs: &Path, dest_id: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (src, dst): (PathBuf, PathBuf) = (src_rootfs.to_path_buf(), bed.dst_bundles().join(dest_id).join("rootfs"));
        let dst_state = bed.dst_runc.root.join(dest_id).join("state.json");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let s = beat_at(&src);
                let d = if dst_state.exists() { beat_at(&dst) } else { None };
                samples.push((s, d));
                std::thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Self { stop, thread: Some(thread) }
    }

    /// Panics if both ran at once; returns how many intervals each ran.
    fn finish(mut self, what: &str) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = self.thread.take().unwrap().join().unwrap();
        let moved = |a: Option<Beat>, b: Option<Beat>| match (a, b) {
            (Some(a), Some(b)) if b.0 > a.0 => Some((b.0 - a.0, b.1)),
            _ => None,
        };
        let (mut src, mut dst) = (0, 0);
        // Which copy beat last, when, and how often the beating copy
        // changed: at most twice (source, destination, and back to the
        // source after a fallback); copies running at once alternate.
        let mut last: Option<(&str, std::time::SystemTime)> = None;
        let mut switches = 0;
        for (i, w) in samples.windows(2).enumerate() {
            let (s, d) = (moved(w[0].0, w[1].0), moved(w[0].1, w[1].1));
            src += s.is_some() as usize;
            dst += d.is_some() as usize;
            let both = || format!("{what}: both copies ran between samples {i} and {} ({:?} -> {:?})", i + 1, w[0], w[1]);
            let mut events: Vec<(&str, u64, std::time::SystemTime)> = Vec::new();
            events.extend(s.map(|(n, at)| ("source", n, at)));
            events.extend(d.map(|(n, at)| ("destination", n, at)));
            events.sort_by_key(|e| e.2);
            if events.len() == 2 {
                // Both within one sample: a hand-over only if the later
                // one beat once, after the other's last beat.
                assert!(events[1].1 == 1 && events[1].2 > events[0].2, "{}", both());
            }
            for (who, _, at) in events {
                if let Some((prev, prev_at)) = last {
                    if prev != who {
                        switches += 1;
                        assert!(at > prev_at && switches <= 2, "{}: the beating copy changed {switches} times", both());
                    }
                }
                last = Some((who, at));
            }
        }
        (src, dst)
    }
}

impl Drop for BeatWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn start_pattern(bed: &Testbed, id: &str, mib: u64) -> (FixtureContainer, String, u64) {
    let src = bed.start_fixture(id, &Workload::Pattern { mib, dirty_kib_per_s: 1024 }).unwrap();
    let st = wait_for(Duration::from_secs(60), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= 2))
        .expect("pattern fixture never completed two passes");
    assert!(st.ok, "{}", st.line);
    (src, st.token, st.passes)
}

/// The destination copy's heartbeat advanced: it runs.
fn destination_beats(bed: &Testbed, dest_id: &str, timeout: Duration) -> bool {
    let rootfs = bed.dst_bundles().join(dest_id).join("rootfs");
    let state = bed.dst_runc.root.join(dest_id).join("state.json");
    let first = wait_for(timeout, || state.exists().then(|| read_pattern_beat(&rootfs)).flatten());
    let Some((_, first)) = first else { return false };
    wait_for(timeout, || read_pattern_beat(&rootfs).filter(|(_, n)| *n > first + 2)).is_some()
}

/// The source runs its own memory again: thawed, the same token, passes
/// going on and every byte as it was.
fn assert_source_resumed_intact(bed: &Testbed, src: &FixtureContainer, token: &str, passes: u64) {
    let thawed = wait_for(Duration::from_secs(30), || (frozen_state(bed, &src.id) == "THAWED").then_some(()));
    assert!(thawed.is_some(), "the source was not thawed");
    let st = wait_for(Duration::from_secs(30), || read_pattern_status(&src.rootfs()).filter(|s| s.passes >= passes + 2))
        .expect("the source's fixture did not go on after the fallback");
    assert_eq!(st.token, token, "the source's fixture restarted");
    assert!(st.ok, "the source's memory changed: {}", st.line);
}

#[test]
fn postcopy_runs_the_container_before_its_memory_arrives_and_it_arrives_intact() {
    let Some(bed) = testbed("pcp") else { return };
    let id = format!("postcopy-{}", bed.tag);
    let (src, token, passes) = start_pattern(&bed, &id, 256);
    let watch = BeatWatch::start(&bed, &src.rootfs(), &id);

    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    // 40 MB/s: the memory takes seconds to follow, long enough to see the
    // copy answer before it all came.
    let mut sender = ChildProcess::spawn(bed.send_command(&id, port, &["--mode", "postcopy", "--bwlimit", "40M"])).unwrap();
    assert!(destination_beats(&bed, &id, Duration::from_secs(60)), "the destination's copy never ran: {}", sender.stderr());
    let answered_at = Instant::now();
    assert_eq!(sender.wait(Duration::from_secs(120)), Some(0), "sender: {}", sender.stderr());
    let finished_at = Instant::now();
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());
    let (_, dst_ran) = watch.finish("post-copy");
    assert!(dst_ran > 0);

    let result = sender.result().expect("a result event").clone();
    assert_eq!(result["mode"], "postcopy", "{result}");
    let pc = &result["postcopy"];
    let pages = pc["pages"].as_u64().unwrap_or(0);
    assert!(pages * 4096 >= 200 << 20, "most of the 256 MiB should come after the restore: {result}");
    assert!(pc["faults"].as_u64().unwrap_or(0) > 0, "the running copy faulted on no page: {result}");
    assert!(pc["background_pages"].as_u64().unwrap_or(0) > 0, "{result}");
    assert!(result.get("fallback_after_run_ms").is_none(), "{result}");
    // The copy answered well before its memory had all come (the sender
    // ends right after the destination said every page is there).
    assert!(
        finished_at.duration_since(answered_at) > Duration::from_secs(1),
        "the copy's heartbeat moved only {:?} before the migration ended: {result}",
        finished_at.duration_since(answered_at)
    );
    assert!(result["frozen_ms"].as_u64().unwrap() < pc["all_pages_after_run_ms"].as_u64().unwrap() + result["frozen_ms"].as_u64().unwrap());

    // Every byte arrived: the fixture's passes go on, same token, ok.
    assert!(!bed.src_runc.exists(&id).unwrap(), "the source is still there");
    let dst = bed.dst_container(&id);
    let st = wait_for(Duration::from_secs(30), || read_pattern_status(&dst.rootfs()).filter(|s| s.passes >= passes + 2))
        .expect("the fixture did not go on verifying on the destination");
    assert_eq!(st.token, token, "the fixture restarted");
    assert!(st.ok, "memory corrupted by post-copy: {}", st.line);
}

/// How a post-copy migration is made to fail after the destination's copy
/// started running.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL of `criu lazy-pages` on the destination.
    KillLazyDaemon,
    /// SIGKILL of the source's CRIU, the page server.
    KillPageServer,
    KillReceiver,
    KillSender,
    /// The link between the hosts goes down.
    CutLink,
}

/// Pids of processes whose command line has every one of `words`.
fn pids_with(words: &[&str]) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if words.iter().all(|w| cmd.contains(w)) {
            pids.push(pid);
        }
    }
    pids
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
}

fn fault_after_run(prefix: &str, fault: Fault) {
    let Some(bed) = testbed(prefix) else { return };
    let id = format!("pcfail-{}", bed.tag);
    let (src, token, passes) = start_pattern(&bed, &id, MIB);
    let watch = BeatWatch::start(&bed, &src.rootfs(), &id);
    let port = port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--timeout", "10"], &[]).unwrap();
    // 8 MB/s: 128 MiB take some 16 s, so the copy runs on long before
    // its last page (a 4 MiB answer takes 0.5 s, well within the lease).
    let mut sender = ChildProcess::spawn(bed.send_command(&id, port, &["--mode", "postcopy", "--bwlimit", "8M", "--postcopy-lease", "3000", "--timeout", "10"])).unwrap();
    assert!(destination_beats(&bed, &id, Duration::from_secs(60)), "the destination's copy never ran: {}", sender.stderr());
    match fault {
        Fault::KillLazyDaemon => {
            let pids = pids_with(&["lazy-pages", &bed.dst_work().display().to_string()]);
            assert!(!pids.is_empty(), "no criu lazy-pages of this test runs");
            pids.into_iter().for_each(kill);
        }
        Fault::KillPageServer => {
            let sender_pid = sender.child.id() as i32;
            // CRIU renames itself (`criu: dump --rpc`): its parent tells it.
            let criu: Vec<i32> = pids_with(&["criu"])
                .into_iter()
                .filter(|p| container_runtime::procinfo::status(*p).is_some_and(|s| s.ppid == sender_pid))
                .collect();
            assert!(!criu.is_empty(), "the sender runs no CRIU");
            criu.into_iter().for_each(kill);
        }
        Fault::KillReceiver => {
            receiver.child.kill().unwrap();
            let _ = receiver.child.wait();
        }
        Fault::KillSender => {
            sender.child.kill().unwrap();
            let _ = sender.child.wait();
        }
        Fault::CutLink => bed.cut_link().unwrap(),
    }
    let fault_at = Instant::now();
    assert_source_resumed_intact(&bed, &src, &token, passes);
    eprintln!("{fault:?}: the source ran again {:?} after the fault", fault_at.elapsed());
    let (src_ran, dst_ran) = watch.finish(&format!("{fault:?}"));
    assert!(src_ran > 0 && dst_ran > 0, "source ran in {src_ran}, destination in {dst_ran} intervals");

    if !matches!(fault, Fault::KillSender) {
        assert_eq!(sender.wait(Duration::from_secs(60)), Some(4), "sender: {}", sender.stderr());
        let result = sender.result().expect("the sender's result").clone();
        assert_eq!(result["source_state"], "running", "{result}");
        assert!(result["fallback_after_run_ms"].as_u64().is_some(), "the result should say the copy had run: {result}");
    }
    if matches!(fault, Fault::CutLink) {
        bed.restore_link();
    }
    if !matches!(fault, Fault::KillReceiver) {
        assert_eq!(receiver.wait(Duration::from_secs(60)), Some(4), "receiver: {}", receiver.stderr());
    } else {
        // What a killed receiver left, the next one's start sweeps.
        let mut next = bed.spawn_receiver(port + 100, &["--once"], &[]).unwrap();
        next.child.kill().unwrap();
        let _ = next.child.wait();
    }
    assert!(!bed.dst_runc.exists(&id).unwrap_or(false), "the destination's copy is still there");
    assert_clean(&bed, &id);
}

#[test]
fn postcopy_falls_back_when_the_lazy_pages_daemon_dies() {
    fault_after_run("pcd", Fault::KillLazyDaemon);
}

#[test]
fn postcopy_falls_back_when_the_page_server_dies() {
    fault_after_run("pcs", Fault::KillPageServer);
}

#[test]
fn postcopy_falls_back_when_the_receiver_is_killed() {
    fault_after_run("pcr", Fault::KillReceiver);
}

#[test]
fn postcopy_falls_back_when_the_sender_is_killed() {
    fault_after_run("pck", Fault::KillSender);
}

#[test]
fn postcopy_falls_back_when_the_link_is_cut() {
    fault_after_run("pcl", Fault::CutLink);
}
