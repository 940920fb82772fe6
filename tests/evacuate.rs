//! Draining a host: `ctmigrate evacuate` moves every running container of
//! the source's runtime root, several at once, and says which moved and
//! which stayed. Five containers: two counters alone, a two-container pod
//! sharing a named network namespace (its members restored into one
//! rebuilt namespace), and an echo server with a live TCP client.
//!
//! With a fault in one container's migration and one in a pod member's,
//! that container and the whole pod stay on the source running, the
//! others move, and the exit code and summary say so.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::echo::{start_echo, EchoClient};
use migration_testbed::{join_network_namespace, CommandResult, ContainerNetwork, FixtureContainer, Side, Testbed, Workload};

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

/// A counter container on the source, joined to `netns` if given; its
/// token once it counts.
fn start_counter(bed: &Testbed, id: &str, netns: Option<&PathBuf>) -> (FixtureContainer, String) {
    let bundle = bed.fixture_bundle(id, &Workload::Counter).unwrap();
    if let Some(ns) = netns {
        join_network_namespace(&bundle, ns).unwrap();
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
    let counters = ["c1", "c2"].iter().map(|n| start_counter(&bed, &format!("{n}-{tag}"), None)).collect();
    let pod = ["pause", "app"].iter().map(|n| start_counter(&bed, &format!("{n}-{tag}"), Some(&pod_path))).collect();
    Some(Fleet { counters, pod, echo, pod_netns, net, bed })
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

    // The client's connection carries on to the moved echo server.
    net.route_via(Side::Destination).unwrap();
    client.assert_flowing(5_000, Duration::from_secs(90), "after evacuating");
    let total = client.finish();
    eprintln!("{total} numbers echoed in order across the evacuation");

    let ids: Vec<String> = [&f.echo.id, pause, app].into_iter().cloned().chain(f.counters.iter().map(|(c, _)| c.id.clone())).collect();
    remove_moved(bed, &ids);
    let left = net.leftovers(&f.echo.id, false);
    assert!(left.is_empty(), "network left behind: {left:#?}");
    assert!(!PathBuf::from(format!("/run/netns/ctmigrate-{leader}")).exists(), "the pod's namespace outlived its containers");
}

#[test]
fn a_fault_keeps_one_container_and_one_pod_whole_on_the_source() {
    let Some(f) = fleet("evf") else { return };
    let (bed, net) = (&f.bed, &f.net);
    let client = EchoClient::connect(net);
    client.assert_flowing(2_000, Duration::from_secs(20), "before evacuating");
    let (c1, c2) = (&f.counters[0].0.id, &f.counters[1].0.id);
    let (pause, app) = (&f.pod[0].0.id, &f.pod[1].0.id);

    // The pod's second member fails on the destination after its restore;
    // the counter c1 fails on the source once frozen.
    let port = common::port();
    let receiver_fault = format!("receiver-after-restore@{app}=error");
    let _receiver = bed.spawn_receiver(port, &["--bridge", &net.bridge, "--max-migrations", "8"], &[("CTMIGRATE_FAILPOINTS", &receiver_fault)]).unwrap();
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
    assert!(outcome(&s, pause)["reason"].as_str().unwrap().contains("pod"), "the pod's other member does not say the pod failed: {s}");

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
    for id in [pause, app] {
        assert!(!PathBuf::from(format!("/run/netns/ctmigrate-{id}")).exists(), "a namespace built for the pod is left on the destination");
    }
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
    assert_eq!(netns_inode(&format!("/proc/{}/ns/net", pid(&pause))), netns_inode(&format!("/proc/{}/ns/net", pid(&app))));
    receiver.poll_events();
    for e in receiver.events.iter().filter(|e| e["event"] == "warning" || e["event"] == "result") {
        eprintln!("receiver: {e}");
    }
    remove_moved(bed, &[pause, app]);
}
