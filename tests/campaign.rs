//! A randomized fault campaign: many migrations, each with one fault at a
//! random instant (a side or CRIU killed, a side stopped, the link cut or
//! lossy), and after each the same invariants:
//!
//! - the two copies never made progress at once (sampled every 100 ms);
//! - exactly one copy runs afterwards, continuing the container's state
//!   (the counter's token: not restarted);
//! - once that copy is removed, neither host keeps anything of the attempt
//!   (runtime state, bundles, image directories, mounts, cgroups, network
//!   namespaces, journal entries left open).
//!
//! A side that was killed is restarted, as an operator's service manager
//! would, and a source left in doubt is settled with `ctmigrate resolve`.
//!
//! `CTMIGRATE_CAMPAIGN_RUNS` (default 100) and `CTMIGRATE_CAMPAIGN_SEED`
//! (default: from the clock, printed) repeat a campaign.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use migration_engine::journal::Journal;
use migration_testbed::{force_remove, ChildProcess, CommandResult};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillSender,
    KillReceiver,
    /// CRIU's dump on the source.
    KillCriu,
    /// CRIU's restore on the destination (started by runc).
    KillCriuRestore,
    StopSender,
    StopReceiver,
    CutLink,
    LosePackets,
}

/// The sender's phases a fault is aimed at (its `phase` events), so that
/// every step of the sequence gets its share: a fault at a random
/// instant of a sub-second migration would mostly land before or after.
const STEPS: [&str; 9] = ["connect", "rootfs-sync", "rootfs-delta", "freeze", "dump", "transfer", "restore", "commit", "cleanup"];

const FAULTS: [Fault; 8] = [
    Fault::KillSender,
    Fault::KillReceiver,
    Fault::KillCriu,
    Fault::KillCriuRestore,
    Fault::StopSender,
    Fault::StopReceiver,
    Fault::CutLink,
    Fault::LosePackets,
];

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// The ctmigrate process the testbed started through `nsenter`: nsenter
/// execs it in place (no fork), so it is that pid once the exec happened.
fn ctmigrate_under(wrapper: u32) -> u32 {
    for _ in 0..200 {
        // Gone, a zombie, or ctmigrate.
        let args = container_runtime::procinfo::cmdline(wrapper as i32).unwrap_or_default();
        if args.first().is_none_or(|a| a.starts_with(EXE.as_bytes())) {
            return wrapper;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("process {wrapper} never became ctmigrate");
}

/// CRIU processes at work for this testbed (found through their
/// ancestors' command lines, which name the testbed's directories).
fn criu_of(tag: &str) -> Vec<u32> {
    use container_runtime::procinfo;
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.flatten()
        .filter_map(|p| p.stat().ok())
        .filter(|stat| stat.comm == "criu")
        .filter(|stat| {
            let mut ppid = stat.ppid;
            for _ in 0..6 {
                let args = procinfo::cmdline(ppid).unwrap_or_default();
                if args.iter().any(|a| String::from_utf8_lossy(a).contains(tag)) {
                    return true;
                }
                let Some(parent) = procinfo::stat(ppid) else { return false };
                ppid = parent.ppid;
            }
            false
        })
        .map(|stat| stat.pid as u32)
        .collect()
}

/// Drops `percent` of the packets between the hosts (both directions).
fn lossy_link(bed: &Testbed, percent: u32) {
    let rules = format!(
        "table inet ctmigrate_test_loss {{\n\
         chain in {{ type filter hook input priority -300; policy accept; iif != \"lo\" numgen random mod 100 < {percent} drop; }}\n\
         chain out {{ type filter hook output priority -300; policy accept; oif != \"lo\" numgen random mod 100 < {percent} drop; }}\n}}\n"
    );
    let path = bed.dir.join("loss.nft");
    std::fs::write(&path, rules).unwrap();
    let ok = std::process::Command::new("ip").args(["netns", "exec", &bed.hosts.dst, "nft", "-f"]).arg(&path).status().unwrap();
    assert!(ok.success(), "nft could not make the link lossy");
}

fn clear_lossy_link(bed: &Testbed) {
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", &bed.hosts.dst, "nft", "delete", "table", "inet", "ctmigrate_test_loss"])
        .stderr(std::process::Stdio::null())
        .status();
}

struct Receiver {
    child: Option<ChildProcess>,
    port: u16,
}

impl Receiver {
    fn ensure_running(&mut self, bed: &Testbed) {
        let alive = self.child.as_mut().map(|c| matches!(c.child.try_wait(), Ok(None))).unwrap_or(false);
        if !alive {
            // A new receiver first settles what the dead one left.
            self.child = Some(bed.spawn_receiver(self.port, &["--timeout", "2"], &[]).unwrap());
        }
    }

    fn pid(&mut self) -> u32 {
        ctmigrate_under(self.child.as_ref().unwrap().child.id())
    }
}

/// Waits until no process acts on a migration of this testbed any more
/// (sender, guard, receiver session), restarting a dead receiver and
/// settling a source left in doubt with `ctmigrate resolve`.
fn settle(bed: &Testbed, receiver: &mut Receiver, what: &str) -> Vec<String> {
    let mut notes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        receiver.ensure_running(bed);
        let open: Vec<_> = ["src", "dst"]
            .iter()
            .flat_map(|side| Journal::new(bed.journal_dir(side)).list().into_iter().flatten().map(move |e| (*side, e)))
            .filter(|(_, e)| !e.is_finished())
            .collect();
        if open.is_empty() {
            return notes;
        }
        assert!(Instant::now() < deadline, "{what}: still open after 120 s: {open:#?}");
        for (side, e) in &open {
            if e.owner_alive() {
                continue;
            }
            let r = CommandResult::run(bed.resolve_command(side, &e.id, &["--timeout", "3"])).unwrap();
            notes.push(format!("resolve on {side} ({}): exit {:?} {}", e.state_name(), r.code, r.stderr.trim()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn campaign_random_faults_keep_exactly_one_copy() {
    let Some(bed) = testbed("cpg") else { return };
    let runs: u32 = std::env::var("CTMIGRATE_CAMPAIGN_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(100);
    let seed: u64 = std::env::var("CTMIGRATE_CAMPAIGN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    eprintln!("campaign: at least {runs} migrations, CTMIGRATE_CAMPAIGN_SEED={seed}");
    // CTMIGRATE_CAMPAIGN_FAULTS=KillCriu,CutLink narrows the faults drawn.
    let only: Option<String> = std::env::var("CTMIGRATE_CAMPAIGN_FAULTS").ok();
    let faults: Vec<Fault> = FAULTS.iter().copied().filter(|f| only.as_ref().map(|o| o.split(',').any(|x| x == format!("{f:?}"))).unwrap_or(true)).collect();
    assert!(!faults.is_empty(), "CTMIGRATE_CAMPAIGN_FAULTS names no fault of {FAULTS:?}");
    let mut rng = Rng(seed);
    let mut receiver = Receiver { child: None, port: port() };
    // fault -> (migrated, source kept, missed: CRIU not caught at work or
    // the sender ended before the step aimed at)
    let mut counts: BTreeMap<Fault, (u32, u32, u32)> = BTreeMap::new();
    let started = Instant::now();
    // First every fault at every step it can be aimed at, then random
    // draws up to `runs` (unless CTMIGRATE_CAMPAIGN_RUNS is set, which
    // makes the whole campaign random).
    let mut plan: Vec<(Fault, &str)> = Vec::new();
    if std::env::var("CTMIGRATE_CAMPAIGN_RUNS").is_err() {
        for f in &faults {
            match f {
                Fault::KillCriu | Fault::KillCriuRestore => plan.push((*f, "-")),
                _ => plan.extend(STEPS.iter().map(|st| (*f, *st))),
            }
        }
    }
    while plan.len() < runs as usize {
        let f = faults[rng.below(faults.len() as u64) as usize];
        plan.push((f, STEPS[rng.below(STEPS.len() as u64) as usize]));
    }
    for (i, (fault, step)) in plan.into_iter().enumerate() {
        let began = Instant::now();
        let what_base = format!("migration {i} ({fault:?}");
        let id = format!("c{i}-{}", bed.tag);
        let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
        let (token, _) = counter_at_least(&src.rootfs(), 3);
        receiver.ensure_running(&bed);
        let watch = TwoCopyWatch::start(&bed, &src.rootfs(), &id);
        let mut sender = ChildProcess::spawn(bed.send_command(
            &id,
            receiver.port,
            &["--timeout", "2", "--restore-timeout", "8", "--in-doubt-timeout", "10", "--mode", "stop-copy"],
        ))
        .unwrap();
        let mut missed_criu = false;
        let mut on_time = true;
        match fault {
            Fault::KillCriu | Fault::KillCriuRestore => {
                // At a random moment of CRIU's work: its dump, or (once
                // the sender waits for it) its restore.
                if fault == Fault::KillCriuRestore {
                    on_time = sender.reached_phase("restore", Duration::from_secs(30));
                }
                let found = wait_for(Duration::from_secs(10), || Some(criu_of(&bed.tag)).filter(|c| !c.is_empty()));
                std::thread::sleep(Duration::from_millis(rng.below(40)));
                match found {
                    Some(pids) => pids.iter().for_each(|p| signal(*p, Signal::SIGKILL)),
                    None => missed_criu = true,
                }
            }
            _ => {
                on_time = sender.reached_phase(step, Duration::from_secs(30));
                std::thread::sleep(Duration::from_millis(rng.below(150)));
            }
        }
        match fault {
            Fault::KillSender => signal(ctmigrate_under(sender.child.id()), Signal::SIGKILL),
            Fault::KillReceiver => {
                signal(receiver.pid(), Signal::SIGKILL);
                std::thread::sleep(Duration::from_millis(rng.below(3000)));
                receiver.ensure_running(&bed);
            }
            Fault::StopSender | Fault::StopReceiver => {
                let pid = if fault == Fault::StopSender { ctmigrate_under(sender.child.id()) } else { receiver.pid() };
                signal(pid, Signal::SIGSTOP);
                std::thread::sleep(Duration::from_millis(1000 + rng.below(4000)));
                signal(pid, Signal::SIGCONT);
            }
            Fault::CutLink => {
                bed.cut_link().unwrap();
                std::thread::sleep(Duration::from_millis(500 + rng.below(6000)));
                bed.restore_link();
            }
            Fault::LosePackets => {
                lossy_link(&bed, 20 + rng.below(30) as u32);
                std::thread::sleep(Duration::from_millis(1000 + rng.below(3000)));
                clear_lossy_link(&bed);
            }
            Fault::KillCriu | Fault::KillCriuRestore => {}
        }
        let what = if matches!(fault, Fault::KillCriu | Fault::KillCriuRestore) { format!("{what_base}, seed {seed})") } else { format!("{what_base} at {step}, seed {seed})") };
        let waited = Instant::now();
        // (None: ended by a signal, as a killed sender does.)
        let code = sender.wait(Duration::from_secs(120));
        assert!(waited.elapsed() < Duration::from_secs(120), "{what}: the sender did not end within 120 s; stderr: {}", sender.stderr());
        let notes = settle(&bed, &mut receiver, &what);
        let (_, _, _) = watch.finish(&what);

        // Exactly one copy, counting on from where it was.
        let on_source = bed.src_runc.exists(&id).unwrap();
        let on_destination = bed.dst_runc.exists(&id).unwrap();
        assert!(
            on_source != on_destination,
            "{what}: sender exit {code:?}, copies on source {on_source}, destination {on_destination}; {notes:?}; sender: {}",
            sender.stderr()
        );
        let rootfs = if on_source { src.rootfs() } else { bed.dst_bundles().join(&id).join("rootfs") };
        if on_source {
            assert_eq!(frozen_state(&bed, &id), "THAWED", "{what}: the source is left frozen; {notes:?}");
            // Its network lock (nftables, in its namespace) is gone too.
            let pid = bed.src_runc.internal_state(&id).unwrap().init_process_pid;
            let locked = container_network::lock::is_locked(&container_network::Netns::Process(pid)).unwrap_or(false);
            assert!(!locked, "{what}: the source runs with its network still locked");
        }
        let (_, now) = read_counter(&rootfs).unwrap_or_else(|| panic!("{what}: no counter"));
        let moving = wait_for(Duration::from_secs(10), || read_counter(&rootfs).filter(|(_, n)| *n > now + 5));
        if moving.is_none() {
            let runc = if on_source { &bed.src_runc } else { &bed.dst_runc };
            let tasks = runc
                .internal_state(&id)
                .ok()
                .and_then(|st| container_runtime::Freezer::for_container(&st).ok())
                .map(|f| f.pids())
                .unwrap_or_default();
            let states: Vec<String> = tasks
                .iter()
                .map(|p| container_runtime::procinfo::stat(*p).map(|s| format!("{} ({}) {}", s.pid, s.comm, s.state)).unwrap_or_default())
                .collect();
            panic!("{what}: the surviving copy ({}) does not run: tasks {states:?}; sender: {}; {notes:?}", if on_source { "source" } else { "destination" }, sender.stderr());
        }
        assert_counting_on(&rootfs, &token, now);
        let entry = counts.entry(fault).or_default();
        if on_destination {
            entry.0 += 1;
        } else {
            entry.1 += 1;
        }
        entry.2 += (missed_criu || !on_time) as u32;

        // The surviving copy goes; then nothing may be left.
        drop(src);
        force_remove(&bed.dst_runc, &id);
        let _ = std::fs::remove_dir_all(bed.dst_bundles().join(&id));
        let left = bed.leftovers(&id);
        assert!(left.is_empty(), "{what}: left behind: {left:#?}");
        let netns_left = || {
            let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
            String::from_utf8_lossy(&list.stdout).lines().any(|l| l.split_whitespace().next() == Some(&format!("ctmigrate-{id}")))
        };
        if netns_left() {
            let receiver_log = receiver.child.as_ref().map(|c| c.stderr()).unwrap_or_default();
            let events: Vec<String> = receiver.child.as_mut().map(|c| {
                c.poll_events();
                c.events.iter().rev().take(15).map(|e| e.to_string()).collect()
            }).unwrap_or_default();
            panic!("{what}: the destination's network namespace ctmigrate-{id} was left; sender: {}; receiver: {receiver_log}; its last events: {events:#?}", sender.stderr());
        }
        eprintln!(
            "{what}: sender exit {code:?}, {} in {:.1} s",
            if on_destination { "migrated" } else { "source kept" },
            began.elapsed().as_secs_f64()
        );
    }
    eprintln!("campaign: {} migrations in {:.0} s, seed {seed}", counts.values().map(|c| c.0 + c.1).sum::<u32>(), started.elapsed().as_secs_f64());
    eprintln!("{:<14} {:>9} {:>12} {:>16}", "fault", "migrated", "source kept", "missed its step");
    for (fault, (m, k, c)) in &counts {
        eprintln!("{:<14} {:>9} {:>12} {:>16}", format!("{fault:?}"), m, k, c);
    }
}
