//! Draining a host: `ctmigrate evacuate` moves every running container of
//! the source's runtime root, several at once, and says which moved and
//! which stayed. Five containers: two counters alone, a two-container pod
//! sharing a named network namespace and, as Kubernetes pods do, an IPC
//! namespace (its members restored into one rebuilt network namespace and
//! one new IPC namespace), and an echo server with a live TCP client.
//!
//! With a fault in one container's migration and one in a pod member's,
//! that container and the whole pod stay on the source running, the
//! others move, and the exit code and summary say so.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::echo::{start_echo, EchoClient};
use migration_testbed::{join_ipc_namespace, join_network_namespace, CommandResult, ContainerNetwork, FixtureContainer, Side, Testbed, Workload};

/// The five containers; fields drop in order (containers, then the
/// networks, then the hosts).
struct Fleet {
    counters: Vec<(FixtureContainer, String)>,
    pod: Vec<(FixtureContainer, String)>,
    echo: FixtureContainer,
    pod_netns: String,
    net: ContainerNetwork,
    bed: Testbed,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.pod_netns]).stderr(std::process::Stdio::null()).status();
    }
}

/// A counter container on the source, joined to `netns` and to the IPC
/// namespace `ipc` if given; its token once it counts.
fn start_counter(bed: &Testbed, id: &str, netns: Option<&PathBuf>, ipc: Option<&PathBuf>) -> (FixtureContainer, String) {
    let bundle = bed.fixture_bundle(id, &Workload::Counter).unwrap();
    if let Some(ns) = netns {
        join_network_namespace(&bundle, ns).unwrap();
    }
    if let Some(ipc) = ipc {
        join_ipc_namespace(&bundle, ipc).unwrap();
    }
    let c = FixtureContainer::start(bed.src_runc.clone(), id, &bundle).unwrap();
    let (token, _) = common::counter_at_least(&c.rootfs(), 3);
    (c, token)
}

fn fleet(prefix: &str) -> Option<Fleet> {
    let bed = common::testbed(prefix)?;
    let net = ContainerNetwork::create(&bed).expect("creating the network");
    let tag = bed.tag.clone();
    let pod_netns = format!("ctm-{tag}-pod");
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["netns", "add", &pod_netns]);
    ip(&["-n", &pod_netns, "link", "set", "lo", "up"]);
    let pod_path = PathBuf::from("/run/netns").join(&pod_netns);
    let echo = start_echo(&bed, &net, &format!("echo-{tag}"));
    let counters = ["c1", "c2"].iter().map(|n| start_counter(&bed, &format!("{n}-{tag}"), None, None)).collect();
    // As Kubernetes makes a pod: the app joins the pause container's IPC
    // namespace, both join the pod's network namespace.
    let pause = start_counter(&bed, &format!("pause-{tag}"), Some(&pod_path), None);
    let pause_ipc = PathBuf::from(format!("/proc/{}/ns/ipc", bed.src_runc.state(&pause.0.id).unwrap().pid));
    // A setting of the pod's IPC namespace and System V objects in it,
    // which must move with it.
    ipc_setting(&pause_ipc, Some(POD_MSGMNB));
    make_sysv_objects(&pause_ipc);
    let app = start_counter(&bed, &format!("app-{tag}"), Some(&pod_path), Some(&pause_ipc));
    let pod = vec![pause, app];
    Some(Fleet { counters, pod, echo, pod_netns, net, bed })
}

/// The pod's `kernel.msgmnb`, not the kernel's default (16384).
const POD_MSGMNB: &str = "12345";

/// `kernel.msgmnb` of the IPC namespace at `ns` (set first to `value` if
/// given), by a thread that enters it.
fn ipc_setting(ns: &std::path::Path, value: Option<&str>) -> String {
    let (ns, value) = (ns.to_path_buf(), value.map(str::to_string));
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWIPC).unwrap();
        if let Some(v) = value {
            std::fs::write("/proc/sys/kernel/msgmnb", v).unwrap();
        }
        std::fs::read_to_string("/proc/sys/kernel/msgmnb").unwrap().trim().to_string()
    })
    .join()
    .unwrap()
}

/// The key of the System V objects the tests make in a pod's IPC namespace.
const SYSV_KEY: libc::key_t = 0x5c7e;
/// What they hold: the segment's first bytes, the one message queued, the
/// semaphore's value.
const SHM_BYTES: &[u8] = b"ctmigrate: shared memory of the pod";
const MESSAGE: &[u8] = b"ctmigrate: one message, once";
const SEM_VALUE: i32 = 7;

/// Runs `f` in a thread of its own inside the IPC namespace at `ns`.
fn in_ipc_namespace<T: Send + 'static>(ns: &std::path::Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
    std::thread::spawn(move || {
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWIPC).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[repr(C)]
struct Message {
    mtype: libc::c_long,
    mtext: [u8; 64],
}

/// Makes a shared memory segment, a message queue with one message and a
/// semaphore set in the IPC namespace at `ns`, each with [`SYSV_KEY`].
fn make_sysv_objects(ns: &std::path::Path) {
    in_ipc_namespace(ns, || {
        // SAFETY: shmget, msgget and semget take plain integers.
        let (shm, queue, sem) = unsafe {
            (libc::shmget(SYSV_KEY, 4096, libc::IPC_CREAT | 0o600), libc::msgget(SYSV_KEY, libc::IPC_CREAT | 0o600), libc::semget(SYSV_KEY, 1, libc::IPC_CREAT | 0o600))
        };
        assert!(shm >= 0 && queue >= 0 && sem >= 0, "making System V objects: {}", std::io::Error::last_os_error());
        // SAFETY: shmat maps the segment at an address of the kernel's
        // choosing; we write within its 4096 bytes and unmap it.
        unsafe {
            let at = libc::shmat(shm, std::ptr::null(), 0);
            assert_ne!(at as isize, -1, "shmat: {}", std::io::Error::last_os_error());
            std::ptr::copy_nonoverlapping(SHM_BYTES.as_ptr(), at as *mut u8, SHM_BYTES.len());
            libc::shmdt(at);
        }
        let mut message = Message { mtype: 1, mtext: [0; 64] };
        message.mtext[..MESSAGE.len()].copy_from_slice(MESSAGE);
        // SAFETY: msgsnd reads MESSAGE.len() bytes of mtext after mtype,
        // within `message`; semctl SETVAL takes an int.
        unsafe {
            assert_eq!(libc::msgsnd(queue, &message as *const Message as *const libc::c_void, MESSAGE.len(), 0), 0, "msgsnd");
            assert_eq!(libc::semctl(sem, 0, libc::SETVAL, SEM_VALUE), 0, "semctl SETVAL");
        }
    })
}

/// Checks that the IPC namespace at `ns` holds what [`make_sysv_objects`]
/// made, the message once (taken off the queue if `take`).
fn assert_sysv_objects(ns: &std::path::Path, take: bool, side: &str) {
    let side = side.to_string();
    in_ipc_namespace(ns, move || {
        // SAFETY: the *get calls take plain integers (no IPC_CREAT: the
        // objects must be there).
        let (shm, queue, sem) = unsafe { (libc::shmget(SYSV_KEY, 0, 0), libc::msgget(SYSV_KEY, 0), libc::semget(SYSV_KEY, 0, 0)) };
        assert!(shm >= 0 && queue >= 0 && sem >= 0, "{side}: the pod's System V objects are missing ({shm}, {queue}, {sem})");
        // SAFETY: the segment is mapped read-only, read within its first
        // bytes and unmapped.
        let bytes = unsafe {
            let at = libc::shmat(shm, std::ptr::null(), libc::SHM_RDONLY);
            assert_ne!(at as isize, -1, "shmat: {}", std::io::Error::last_os_error());
            let bytes = std::slice::from_raw_parts(at as *const u8, SHM_BYTES.len()).to_vec();
            libc::shmdt(at);
            bytes
        };
        assert_eq!(bytes, SHM_BYTES, "{side}: the segment's contents");
        // SAFETY: msgctl writes a msqid_ds we own; semctl GETVAL takes ints.
        let (queued, value) = unsafe {
            let mut stat: libc::msqid_ds = std::mem::zeroed();
            assert_eq!(libc::msgctl(queue, libc::IPC_STAT, &mut stat), 0, "msgctl");
            (stat.msg_qnum, libc::semctl(sem, 0, libc::GETVAL))
        };
        assert_eq!(queued, 1, "{side}: messages on the queue (once, not once a member)");
        assert_eq!(value, SEM_VALUE, "{side}: the semaphore's value");
        if take {
            let mut message = Message { mtype: 0, mtext: [0; 64] };
            // SAFETY: msgrcv writes at most 64 bytes of mtext into `message`.
            let n = unsafe { libc::msgrcv(queue, &mut message as *mut Message as *mut libc::c_void, 64, 0, libc::IPC_NOWAIT) };
            assert_eq!(&message.mtext[..n.max(0) as usize], MESSAGE, "{side}: the message");
        }
    })
}

/// The pod's IPC namespace's file goes once every member's receiver
/// session ended (the receiver may end a session just after its sender).
fn assert_pod_ipc_file_goes(leader: &str) {
    let file = PathBuf::from(format!("/run/ctmigrate/ipcns/{leader}"));
    common::wait_for(Duration::from_secs(10), || (!file.exists()).then_some(()))
        .unwrap_or_else(|| panic!("{} outlived the pod's migration", file.display()));
}

fn summary(out: &CommandResult) -> serde_json::Value {
    let s = out.events.iter().find(|e| e["event"] == "summary").cloned().unwrap_or_else(|| panic!("no summary event: {}\n{}", out.stdout, out.stderr));
    eprintln!("summary: {s}");
    s
}

fn outcome<'a>(summary: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    summary["containers"].as_array().unwrap().iter().find(|c| c["container"] == id).unwrap_or_else(|| panic!("{id} not in the summary: {summary}"))
}

fn netns_inode(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

/// The destination's copy of a container runs, counting on with the
/// source's token.
fn assert_moved(bed: &Testbed, id: &str, token: &str) {
    bed.dst_runc.running(id).unwrap_or_else(|e| panic!("{id} does not run on the destination: {e}"));
    let rootfs = bed.dst_bundles().join(id).join("rootfs");
    let (_, now) = migration_testbed::read_counter(&rootfs).unwrap();
    common::assert_counting_on(&rootfs, token, now);
}

/// Deletes the destination's copies and their committed bundles; then
/// nothing of any migration may remain on either host.
fn remove_moved(bed: &Testbed, ids: &[String]) {
    for id in ids {
        drop(bed.dst_container(id));
        let _ = std::fs::remove_dir_all(bed.dst_bundles().join(id));
    }
    for id in ids {
        common::assert_clean(bed, id);
    }
}

#[test]
fn evacuate_moves_every_container_a_pod_whole_and_a_live_connection() {
    let Some(f) = fleet("ev") else { return };
    let (bed, net) = (&f.bed, &f.net);
    let client = EchoClient::connect(net);
    client.assert_flowing(2_000, Duration::from_secs(20), "before evacuating");

    let port = common::port();
    let _receiver = bed.spawn_receiver(port, &["--bridge", &net.bridge, "--max-migrations", "8"], &[]).unwrap();
    let out = CommandResult::run(bed.evacuate_command(port, &["--tcp-established", "--parallel", "2", "--mode", "stop-copy"])).unwrap();
    assert_eq!(out.code, Some(0), "evacuate failed: {}\n{}", out.stdout, out.stderr);
    let s = summary(&out);
    assert_eq!((s["moved"].as_u64(), s["stayed"].as_u64(), s["exit_code"].as_i64()), (Some(5), Some(0), Some(0)), "{s}");
    // Each migration's own events say which container they are about.
    let results: Vec<_> = out.events.iter().filter(|e| e["event"] == "result").collect();
    assert_eq!(results.len(), 5, "one result a container");
    assert!(out.events.iter().filter(|e| e["event"] == "phase").all(|e| e["container"].is_string()), "a phase event without its container");

    // Nothing is left on the source: no container, no pod namespace.
    assert!(bed.src_runc.list().unwrap().is_empty(), "the source runtime root still lists {:?}", bed.src_runc.list());
    assert!(!PathBuf::from("/run/netns").join(&f.pod_netns).exists(), "the pod's namespace is still on the source");

    // Every container runs on the destination, as it was.
    for (c, token) in f.counters.iter().chain(&f.pod) {
        assert_moved(bed, &c.id, token);
    }
    // The pod's members share one rebuilt namespace, the one built for
    // its leader.
    let (pause, app) = (&f.pod[0].0.id, &f.pod[1].0.id);
    let leader = outcome(&s, pause)["pod"].as_str().expect("the pod's leader in the summary").to_string();
    assert_eq!(outcome(&s, app)["pod"], leader.as_str());
    let pid = |id: &str| bed.dst_runc.state(id).unwrap().pid;
    let (pause_ns, app_ns) = (netns_inode(&format!("/proc/{}/ns/net", pid(pause))), netns_inode(&format!("/proc/{}/ns/net", pid(app))));
    assert_eq!(pause_ns, app_ns, "the pod's members are in two namespaces on the destination");
    assert_eq!(pause_ns, netns_inode(&format!("/run/netns/ctmigrate-{leader}")));
    // And one IPC namespace, made for the pod, holding its settings.
    let ipc = |id: &str| netns_inode(&format!("/proc/{}/ns/ipc", pid(id)));
    assert_eq!(ipc(pause), ipc(app), "the pod's members are in two IPC namespaces on the destination");
    assert_ne!(ipc(pause), netns_inode("/proc/self/ns/ipc"), "the pod runs in the host's IPC namespace");
    let moved_ipc = PathBuf::from(format!("/proc/{}/ns/ipc", pid(app)));
    assert_eq!(ipc_setting(&moved_ipc, None), POD_MSGMNB, "the pod's IPC settings did not move");
    assert_sysv_objects(&moved_ipc, true, "destination");
    assert_pod_ipc_file_goes(&leader);

    // The client's connection carries on to the moved echo server.
    net.route_via(Side::Destination).unwrap();
    client.assert_flowing(5_000, Duration::from_secs(90), "after evacuating");
    let total = client.finish();
    eprintln!("{total} numbers echoed in order across the evacuation");

    // The pod's leader deleted first: the other member keeps the pod's
    // namespace, and the last member's deletion removes it.
    let member = if *pause == leader { app } else { pause };
    let pod_netns = PathBuf::from(format!("/run/netns/ctmigrate-{leader}"));
    drop(bed.dst_container(&leader));
    assert!(pod_netns.exists(), "deleting the pod's leader removed the namespace its other member runs in");
    assert_eq!(netns_inode(&format!("/proc/{}/ns/net", pid(member))), netns_inode(&pod_netns.to_string_lossy()));
    drop(bed.dst_container(member));
    assert!(!pod_netns.exists(), "the pod's namespace outlived its last member");

    let ids: Vec<String> = [&f.echo.id, pause, app].into_iter().cloned().chain(f.counters.iter().map(|(c, _)| c.id.clone())).collect();
    remove_moved(bed, &ids);
    let left = net.leftovers(&f.echo.id, false);
    assert!(left.is_empty(), "network left behind: {left:#?}");
    assert!(!PathBuf::from(format!("/run/netns/ctmigrate-{leader}")).exists(), "the pod's namespace outlived its containers");
    assert!(!PathBuf::from(format!("/run/ctmigrate/ipcns/{leader}")).exists(), "the pod's IPC namespace outlived its containers");
}

#[test]
fn a_fault_keeps_one_container_and_one_pod_whole_on_the_source() {
    let Some(f) = fleet("evf") else { return };
    let (bed, net) = (&f.bed, &f.net);
    let client = EchoClient::connect(net);
    client.assert_flowing(2_000, Duration::from_secs(20), "before evacuating");
    let (c1, c2) = (&f.counters[0].0.id, &f.counters[1].0.id);
    let (pause, app) = (&f.pod[0].0.id, &f.pod[1].0.id);

    // The pod's leader fails on the destination after its restore, while
    // the other member's restore, held back, is still to come: it must
    // find the pod's namespaces there (they go with the pod's last
    // session, not with the leader's copy). The counter c1 fails on the
    // source once frozen.
    let port = common::port();
    // (The leader is `app`: both join a named namespace, and the first by
    // id leads.)
    let (leader, member) = (app, pause);
    let receiver_fault = format!("receiver-after-restore@{leader}=error,receiver-before-restore@{member}=sleep:4000");
    let mut receiver = bed.spawn_receiver(port, &["--bridge", &net.bridge, "--max-migrations", "8"], &[("CTMIGRATE_FAILPOINTS", &receiver_fault)]).unwrap();
    let mut cmd = bed.evacuate_command(port, &["--tcp-established", "--parallel", "3", "--mode", "stop-copy"]);
    cmd.env("CTMIGRATE_FAILPOINTS", format!("sender-after-freeze@{c1}=error"));
    let out = CommandResult::run(cmd).unwrap();
    // Resumed sources: exit 4, the most serious outcome of the three.
    assert_eq!(out.code, Some(4), "{}\n{}", out.stdout, out.stderr);
    let s = summary(&out);
    assert_eq!((s["moved"].as_u64(), s["stayed"].as_u64(), s["exit_code"].as_i64()), (Some(2), Some(3), Some(4)), "{s}");
    for id in [c1, pause, app] {
        let o = outcome(&s, id);
        assert_eq!((o["moved"].as_bool(), o["source_state"].as_str()), (Some(false), Some("running")), "{o}");
        assert!(o["reason"].as_str().is_some_and(|r| !r.is_empty()), "no reason for {id}: {o}");
    }
    // The other member stopped for the pod's sake; on the destination its
    // restore, after the leader's copy was gone, still found the pod's
    // namespaces (then the sender's Abort removed it).
    assert_eq!(outcome(&s, member)["pod"].as_str(), Some(leader.as_str()), "the pod's leader is not the one the fault was meant for");
    let why = outcome(&s, member)["reason"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("another container of the pod failed"), "{member} stayed for another reason: {why}");
    let restored = format!("restored `{member}`");
    let seen = common::wait_for(Duration::from_secs(10), || {
        receiver.poll_events();
        receiver.events.iter().any(|e| e["event"] == "warning" && e["message"].as_str().is_some_and(|m| m.contains(&restored))).then_some(())
    });
    assert!(seen.is_some(), "{member}'s restore failed once its leader's copy was removed: {:?}", receiver.events.iter().filter(|e| e["event"] == "result").collect::<Vec<_>>());

    // What stayed runs on the source as it was, the pod still sharing its
    // namespace; nothing of it is on the destination.
    for (c, token) in [&f.counters[0], &f.pod[0], &f.pod[1]] {
        common::assert_source_runs(bed, c, token);
    }
    let src_pid = |id: &str| bed.src_runc.state(id).unwrap().pid;
    assert_eq!(netns_inode(&format!("/proc/{}/ns/net", src_pid(pause))), netns_inode(&format!("/run/netns/{}", f.pod_netns)));
    assert_eq!(netns_inode(&format!("/proc/{}/ns/net", src_pid(app))), netns_inode(&format!("/run/netns/{}", f.pod_netns)));
    let mut on_destination = bed.dst_runc.list().unwrap();
    on_destination.sort();
    let mut moved = vec![f.echo.id.clone(), c2.clone()];
    moved.sort();
    assert_eq!(on_destination, moved, "the destination holds other than what moved");
    // The pod's namespaces go with its last session on the destination.
    for id in [pause, app] {
        let netns = PathBuf::from(format!("/run/netns/ctmigrate-{id}"));
        let gone = common::wait_for(Duration::from_secs(10), || (!netns.exists()).then_some(()));
        assert!(gone.is_some(), "a namespace built for the pod is left on the destination");
        assert_pod_ipc_file_goes(id);
    }
    assert_eq!(netns_inode(&format!("/proc/{}/ns/ipc", src_pid(pause))), netns_inode(&format!("/proc/{}/ns/ipc", src_pid(app))), "the pod's members no longer share their IPC namespace");
    assert_sysv_objects(&PathBuf::from(format!("/proc/{}/ns/ipc", src_pid(app))), false, "source");
    assert_moved(bed, c2, &f.counters[1].1);
    net.route_via(Side::Destination).unwrap();
    client.assert_flowing(5_000, Duration::from_secs(90), "after evacuating");
    client.finish();

    remove_moved(bed, &moved);
    for id in [c1, pause, app] {
        common::assert_clean(bed, id);
    }
}

/// The sender dies in the middle of the pod's commit: one member's Commit
/// went out, the other's may not have. The destination committed the pod
/// at the first Commit, so it runs both members; each member's freeze
/// guard finds `commit-sent` journalled (no Commit goes out before every
/// member's is), asks the destination, and removes the source. One copy
/// of the pod, whole, on one side.
#[test]
fn a_sender_killed_during_a_pods_commit_leaves_the_pod_whole_on_one_side() {
    let Some(f) = fleet("evk") else { return };
    let bed = &f.bed;
    let (pause, app) = (f.pod[0].0.id.clone(), f.pod[1].0.id.clone());
    let port = common::port();
    let mut receiver = bed.spawn_receiver(port, &["--bridge", &f.net.bridge, "--max-migrations", "8"], &[]).unwrap();
    let mut cmd = bed.source_command_for(&["send", &pause, &app], port, &["--mode", "stop-copy"]);
    cmd.env("CTMIGRATE_FAILPOINTS", format!("sender-after-commit@{pause}=exit"));
    let out = CommandResult::run(cmd).unwrap();
    assert_ne!(out.code, Some(0), "the sender was to die: {}", out.stderr);

    // The guards settle both members with the destination's word.
    let settled = common::wait_for(Duration::from_secs(90), || {
        let left = bed.src_runc.list().unwrap();
        (!left.contains(&pause) && !left.contains(&app)).then_some(())
    });
    assert!(settled.is_some(), "the source still has {:?}; destination: {:?}", bed.src_runc.list(), bed.dst_runc.list());
    for (c, token) in &f.pod {
        assert_moved(bed, &c.id, token);
    }
    let pid = |id: &str| bed.dst_runc.state(id).unwrap().pid;
    for kind in ["net", "ipc"] {
        assert_eq!(netns_inode(&format!("/proc/{}/ns/{kind}", pid(&pause))), netns_inode(&format!("/proc/{}/ns/{kind}", pid(&app))), "{kind}");
    }
    let moved_ipc = PathBuf::from(format!("/proc/{}/ns/ipc", pid(&app)));
    assert_eq!(ipc_setting(&moved_ipc, None), POD_MSGMNB, "the pod's IPC settings did not move");
    assert_sysv_objects(&moved_ipc, true, "destination");
    assert_pod_ipc_file_goes(&pause);
    receiver.poll_events();
    for e in receiver.events.iter().filter(|e| e["event"] == "warning" || e["event"] == "result") {
        eprintln!("receiver: {e}");
    }
    remove_moved(bed, &[pause, app]);
}

/// The receiver dies between the pod's two commits: the first member's
/// Commit was journalled, the second member's session (held back before
/// reading its own) dies with it. The pod's commit was journalled first,
/// so the restarted receiver lets the second copy run too, and each
/// sender, in doubt, learns that both committed: the pod is whole on the
/// destination, nothing on the source.
#[test]
fn a_receiver_killed_between_a_pods_commits_runs_the_whole_pod_after_its_restart() {
    let Some(f) = fleet("evd") else { return };
    let bed = &f.bed;
    let (pause, app) = (f.pod[0].0.id.clone(), f.pod[1].0.id.clone());
    let port = common::port();
    let faults = format!("receiver-after-commit-journalled@{pause}=exit,receiver-after-ready@{app}=sleep:3000");
    let mut receiver = bed.spawn_receiver(port, &["--bridge", &f.net.bridge, "--max-migrations", "8"], &[("CTMIGRATE_FAILPOINTS", &faults)]).unwrap();
    let mut sender = migration_testbed::ChildProcess::spawn(bed.source_command_for(&["send", &pause, &app], port, &["--mode", "stop-copy", "--in-doubt-timeout", "120"])).unwrap();
    // Killed by its failpoint: it ends without an exit code.
    let died = common::wait_for(Duration::from_secs(60), || receiver.child.try_wait().ok().flatten());
    assert!(died.is_some_and(|status| status.code().is_none()), "the receiver was to die at its failpoint: {died:?}");
    // A new receiver on the same address settles what the dead one left.
    let _restarted = bed.spawn_receiver(port, &["--bridge", &f.net.bridge, "--max-migrations", "8"], &[]).unwrap();
    let code = sender.wait(Duration::from_secs(150));
    assert_eq!(code, Some(0), "the senders did not settle as migrated: {}", sender.stderr());
    let on_source = bed.src_runc.list().unwrap();
    assert!(!on_source.contains(&pause) && !on_source.contains(&app), "the source still has {on_source:?}");
    for (c, token) in &f.pod {
        assert_moved(bed, &c.id, token);
    }
    let pid = |id: &str| bed.dst_runc.state(id).unwrap().pid;
    for kind in ["net", "ipc"] {
        assert_eq!(netns_inode(&format!("/proc/{}/ns/{kind}", pid(&pause))), netns_inode(&format!("/proc/{}/ns/{kind}", pid(&app))), "{kind}");
    }
    assert_sysv_objects(&PathBuf::from(format!("/proc/{}/ns/ipc", pid(&app))), true, "destination");
    // The dead receiver's sessions left the IPC namespace's file; the
    // restarted one's recovery removes it.
    assert_pod_ipc_file_goes(&pause);
    remove_moved(bed, &[pause, app]);
}

/// Two containers sharing an IPC namespace, each with a network namespace
/// of its own (as `docker run --ipc container:NAME` makes them): they move
/// as a pod, restored into one IPC namespace made for them, holding its
/// settings, each into a network namespace of its own.
#[test]
fn containers_sharing_only_an_ipc_namespace_move_as_a_pod_each_with_its_network() {
    let Some(bed) = common::testbed("evi") else { return };
    let tag = bed.tag.clone();
    let first = start_counter(&bed, &format!("ipca-{tag}"), None, None);
    let first_ipc = PathBuf::from(format!("/proc/{}/ns/ipc", bed.src_runc.state(&first.0.id).unwrap().pid));
    ipc_setting(&first_ipc, Some(POD_MSGMNB));
    make_sysv_objects(&first_ipc);
    let second = start_counter(&bed, &format!("ipcb-{tag}"), None, Some(&first_ipc));
    let (a, b) = (first.0.id.clone(), second.0.id.clone());
    let src_pid = |id: &str| bed.src_runc.state(id).unwrap().pid;
    assert_ne!(netns_inode(&format!("/proc/{}/ns/net", src_pid(&a))), netns_inode(&format!("/proc/{}/ns/net", src_pid(&b))));

    let port = common::port();
    let _receiver = bed.spawn_receiver(port, &["--max-migrations", "4"], &[]).unwrap();
    let out = CommandResult::run(bed.source_command_for(&["send", &a, &b], port, &["--mode", "stop-copy"])).unwrap();
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let s = summary(&out);
    assert_eq!(outcome(&s, &b)["pod"].as_str(), Some(a.as_str()), "not moved as one pod: {s}");
    assert!(bed.src_runc.list().unwrap().is_empty(), "the source still has {:?}", bed.src_runc.list());
    for (c, token) in [&first, &second] {
        assert_moved(&bed, &c.id, token);
    }
    let pid = |id: &str| bed.dst_runc.state(id).unwrap().pid;
    let ns = |id: &str, kind: &str| netns_inode(&format!("/proc/{}/ns/{kind}", pid(id)));
    assert_eq!(ns(&a, "ipc"), ns(&b, "ipc"), "the pair is in two IPC namespaces on the destination");
    assert_ne!(ns(&a, "ipc"), netns_inode("/proc/self/ns/ipc"));
    assert_ne!(ns(&a, "net"), ns(&b, "net"), "the pair was put in one network namespace");
    let moved_ipc = PathBuf::from(format!("/proc/{}/ns/ipc", pid(&b)));
    assert_eq!(ipc_setting(&moved_ipc, None), POD_MSGMNB, "the IPC settings did not move");
    assert_sysv_objects(&moved_ipc, true, "destination");
    assert_pod_ipc_file_goes(&a);
    remove_moved(&bed, &[a, b]);
}

/// A pod member cannot move alone (its namespace would be taken from the
/// other), and a list with a container that does not run, or a
/// destination id for several, is refused with one line; nothing moves.
#[test]
fn a_pod_member_alone_and_bad_lists_are_refused_with_nothing_touched() {
    let Some(f) = fleet("evr") else { return };
    let bed = &f.bed;
    let (pause, app) = (f.pod[0].0.id.as_str(), f.pod[1].0.id.as_str());
    let before = bed.src_runc.list().unwrap();
    let port = common::port();

    let alone = bed.run_sender(pause, port, &[], &[]).unwrap();
    assert_eq!(alone.code, Some(3), "{}", alone.stderr);
    assert!(alone.stderr.contains("shares its network namespace") && alone.stderr.contains("ctmigrate send"), "{}", alone.stderr);

    let missing = CommandResult::run(bed.source_command_for(&["send", pause, "no-such-container"], port, &[])).unwrap();
    assert_eq!(missing.code, Some(3), "{}", missing.stderr);
    assert!(missing.stderr.contains("no-such-container") && missing.stderr.lines().count() == 1, "{}", missing.stderr);

    let renamed = CommandResult::run(bed.source_command_for(&["send", pause, app, "--dest-id", "x"], port, &[])).unwrap();
    assert_eq!(renamed.code, Some(2), "{}", renamed.stderr);
    assert!(renamed.stderr.contains("--dest-id"), "{}", renamed.stderr);

    assert_eq!(bed.src_runc.list().unwrap(), before, "a refused command changed the source");
    for (c, token) in f.pod.iter().chain(&f.counters) {
        common::assert_source_runs(bed, c, token);
    }
}

/// Benchmark (report, not a test; `cargo test --release --test evacuate --
/// --ignored bench_evacuate --nocapture`): `evacuate` of 8 containers of
/// 256 MiB with `--parallel` 1, 2 and 4 in one run, against the baseline
/// of one such container moved alone (its frozen time). Reports each
/// parallelism's total time as a ratio of `--parallel 1`'s, and its
/// longest frozen time as a ratio of the frozen time alone.
/// `CTMIGRATE_BENCH_RUNS` rounds (default 1), the parallelisms interleaved.
#[test]
#[ignore]
fn bench_evacuate() {
    if !common::can_run(None) {
        return;
    }
    const CONTAINERS: usize = 8;
    const MIB: u64 = 256;
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let start_all = |bed: &Testbed, n: usize, round: usize| -> Vec<FixtureContainer> {
        let list: Vec<FixtureContainer> = (0..n)
            .map(|i| bed.start_fixture(&format!("b{round}x{i}-{}", bed.tag), &Workload::Pattern { mib: MIB, dirty_kib_per_s: 1024 }).unwrap())
            .collect();
        for c in &list {
            common::wait_for(Duration::from_secs(120), || migration_testbed::read_pattern_status(&c.rootfs()).filter(|s| s.passes >= 1))
                .expect("pattern fixture never completed a pass");
        }
        list
    };
    let frozen_of = |s: &serde_json::Value| -> Vec<u64> { s["containers"].as_array().unwrap().iter().filter_map(|c| c["frozen_ms"].as_u64()).collect() };
    let mut alone = Vec::new();
    let mut totals: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
    let mut worst_frozen: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
    let bed = common::testbed("evb").unwrap();
    let port = common::port();
    let _receiver = bed.spawn_receiver(port, &["--max-migrations", "8"], &[]).unwrap();
    let mut round = 0;
    for run in 0..runs {
        // Baseline: one container alone.
        round += 1;
        let one = start_all(&bed, 1, round);
        let out = CommandResult::run(bed.evacuate_command(port, &["--parallel", "1", "--mode", "stop-copy"])).unwrap();
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        alone.extend(frozen_of(&summary(&out)));
        let ids: Vec<String> = one.iter().map(|c| c.id.clone()).collect();
        drop(one);
        remove_moved(&bed, &ids);
        let mut order = [1usize, 2, 4];
        order.rotate_left(run % 3);
        for parallel in order {
            round += 1;
            let list = start_all(&bed, CONTAINERS, round);
            let p = parallel.to_string();
            let out = CommandResult::run(bed.evacuate_command(port, &["--parallel", &p, "--mode", "stop-copy"])).unwrap();
            assert_eq!(out.code, Some(0), "{}", out.stderr);
            let s = summary(&out);
            totals.entry(parallel).or_default().push(s["total_ms"].as_u64().unwrap());
            worst_frozen.entry(parallel).or_default().push(frozen_of(&s).into_iter().max().unwrap());
            eprintln!("run {run} --parallel {parallel}: total {} ms, frozen {:?} ms", s["total_ms"], frozen_of(&s));
            // Where the longest frozen time went.
            if let Some(worst) = out.events.iter().filter(|e| e["event"] == "result").max_by_key(|e| e["frozen_ms"].as_u64()) {
                eprintln!("  longest: {} {}", worst["container"], worst["frozen_phases"]);
            }
            let ids: Vec<String> = list.iter().map(|c| c.id.clone()).collect();
            drop(list);
            remove_moved(&bed, &ids);
        }
    }
    let median = |mut v: Vec<u64>| {
        v.sort();
        v[v.len() / 2]
    };
    let alone = median(alone);
    let base = median(totals[&1].clone());
    eprintln!("\n{CONTAINERS} containers of {MIB} MiB, {runs} run(s), medians; frozen alone {alone} ms");
    eprintln!("| --parallel | total (ms) | total / --parallel 1 | longest frozen (ms) | longest frozen / alone |");
    eprintln!("|---:|---:|---:|---:|---:|");
    for (parallel, t) in &totals {
        let (total, frozen) = (median(t.clone()), median(worst_frozen[parallel].clone()));
        eprintln!("| {parallel} | {total} | {:.2} | {frozen} | {:.2} |", total as f64 / base as f64, frozen as f64 / alone as f64);
    }
}
