//! The container's network moves with it: a container whose namespace is
//! a path in config.json, wired to a bridge on the source host, migrates
//! to a destination whose receiver rebuilds the namespace on its own
//! bridge; one TCP connection from a third namespace carries on across the
//! migration (and across failed ones), and nothing is left behind.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::echo::{start_echo, EchoClient, ECHO_PORT};
use migration_testbed::{build_bundle, connect_from, ContainerNetwork, FixtureContainer, Side, Testbed, Workload};

/// A testbed with the three-namespace network and an echo container in
/// the source's named namespace. Fields drop in order: the container
/// before the network, the network before the hosts.
struct EchoBed {
    _src: FixtureContainer,
    id: String,
    net: ContainerNetwork,
    bed: Testbed,
}

fn echo_bed(prefix: &str) -> Option<EchoBed> {
    let bed = common::testbed(prefix)?;
    let net = ContainerNetwork::create(&bed).expect("creating the network");
    // Ids are unique per test: runc puts a container without a cgroups
    // path in the cgroup named by its id.
    let id = format!("echo-{}", bed.tag);
    let src = start_echo(&bed, &net, &id);
    Some(EchoBed { _src: src, id, net, bed })
}

fn assert_no_network_leftovers(net: &ContainerNetwork, dest_id: &str, source_netns: bool, context: &str) {
    let left = net.leftovers(dest_id, source_netns);
    assert!(left.is_empty(), "{context}: left behind: {left:#?}");
}

#[test]
fn tcp_connection_survives_migration_with_the_network() {
    tcp_connection_survives("nt", &[]);
}

/// Post-copy: the container answers on the destination while its memory
/// still arrives, and the client's connection carries on.
#[test]
fn tcp_connection_survives_a_postcopy_migration() {
    tcp_connection_survives("ntp", &["--mode", "postcopy"]);
}

fn tcp_connection_survives(prefix: &str, mode: &[&str]) {
    let Some(e) = echo_bed(prefix) else { return };
    let (bed, net, id) = (&e.bed, &e.net, e.id.as_str());
    let client = EchoClient::connect(net);
    client.assert_flowing(2_000, Duration::from_secs(20), "before migrating");

    let port = common::port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--bridge", &net.bridge], &[]).unwrap();
    let mut args = vec!["--tcp-established"];
    args.extend_from_slice(mode);
    let sent = bed.run_sender(id, port, &args, &[]).unwrap();
    if !mode.is_empty() {
        let result = sent.result().expect("a result event");
        assert_eq!(result["mode"], "postcopy", "{result}");
        assert!(result["postcopy"]["pages"].as_u64().is_some_and(|p| p > 0), "no page came after the restore: {result}");
    }
    assert_eq!(sent.code, Some(0), "migration failed: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(30)), Some(0), "receiver: {}", receiver.stderr());

    // The source is gone, with its namespace and bridge port; the
    // destination runs the container at the same address and MAC.
    assert!(bed.src_runc.list().unwrap().is_empty(), "the source container is still there");
    let dst = bed.dst_container(id);
    bed.dst_runc.running(id).expect("the destination runs the container");
    let pid = bed.dst_runc.state(id).unwrap().pid;
    let links = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ip", "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&links.stdout).contains(&net.container_mac), "eth0 lost its MAC: {}", String::from_utf8_lossy(&links.stdout));

    // The route moves to the destination; the same connection carries on.
    net.route_via(Side::Destination).unwrap();
    client.assert_flowing(5_000, Duration::from_secs(90), "after migrating");
    let total = client.finish();
    eprintln!("{total} numbers echoed in order across the migration");

    // Deleting the container runs the receiver's poststop hook, which
    // removes the namespace it built.
    drop(dst);
    assert_no_network_leftovers(net, id, false, "after success and delete");
    std::fs::remove_dir_all(bed.dst_bundles().join(id)).expect("the committed bundle");
    common::assert_clean(bed, id);
}

#[test]
fn failed_migrations_keep_the_connection_and_leave_no_network_state() {
    let Some(e) = echo_bed("nf") else { return };
    let (bed, net, id) = (&e.bed, &e.net, e.id.as_str());
    let client = EchoClient::connect(net);
    client.assert_flowing(1_000, Duration::from_secs(20), "before migrating");

    // One failure in each phase, on the side where it happens.
    let failures = [
        ("receiver-after-manifest", true),
        ("sender-after-freeze", false),
        ("sender-after-dump", false),
        ("receiver-before-restore", true),
        ("sender-before-commit", false),
        // (A failure after the destination committed leaves its copy
        // running and the source in doubt, frozen: tests/fenced_commit.rs.)
    ];
    for (failpoint, on_receiver) in failures {
        let fp = format!("{failpoint}=error");
        let env = [("CTMIGRATE_FAILPOINTS", fp.as_str())];
        type Env<'a> = &'a [(&'a str, &'a str)];
        let (recv_env, send_env): (Env, Env) = if on_receiver { (&env, &[]) } else { (&[], &env) };
        let port = common::port();
        let mut receiver = bed.spawn_receiver(port, &["--once", "--bridge", &net.bridge], recv_env).unwrap();
        let sent = bed.run_sender(id, port, &["--tcp-established"], send_env).unwrap();
        // 3 before the freeze, 4 after it: the source runs in each case.
        assert!(matches!(sent.code, Some(3) | Some(4)), "{failpoint}: exit {:?}: {}", sent.code, sent.stderr);
        receiver.wait(Duration::from_secs(30));

        assert_eq!(common::frozen_state(bed, id), "THAWED", "{failpoint}: the source is still frozen");
        bed.src_runc.running(id).unwrap_or_else(|e| panic!("{failpoint}: the source is not running: {e}"));
        client.assert_flowing(1_000, Duration::from_secs(60), &format!("after a failure at {failpoint}"));
        assert_no_network_leftovers(net, id, true, failpoint);
        common::assert_clean(bed, id);
    }
    client.finish();
}

#[test]
fn a_missing_bridge_is_refused_before_the_source_is_frozen() {
    let Some(e) = echo_bed("nb") else { return };
    let (bed, net, id) = (&e.bed, &e.net, e.id.as_str());

    // A receiver told of a bridge that does not exist does not start.
    let out = bed.receive_command(common::port(), &["--once", "--bridge", "br-none"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("br-none") && stderr.contains("does not exist") && stderr.trim().lines().count() == 1, "{stderr}");

    // A receiver without a bridge refuses the container at its manifest.
    let port = common::port();
    let mut receiver = bed.spawn_receiver(port, &["--once"], &[]).unwrap();
    let sent = bed.run_sender(id, port, &["--tcp-established"], &[]).unwrap();
    receiver.wait(Duration::from_secs(30));
    assert_eq!(sent.code, Some(3), "{}", sent.stderr);
    assert!(sent.stderr.contains("--bridge"), "{}", sent.stderr);
    let froze = sent.events.iter().any(|e| e["event"] == "phase" && e["phase"] == "freeze");
    assert!(!froze, "the sender reached the freeze: {:?}", sent.events);
    assert_eq!(common::frozen_state(bed, id), "THAWED");
    bed.src_runc.running(id).unwrap();
    assert_no_network_leftovers(net, id, true, "after the refusal");
    common::assert_clean(bed, id);
}

/// The `hooks` block of docs/hooks.md, with this test's binary, bridge and
/// addresses in place of the example's.
fn documented_hooks(bridge: &str, address: &str, gateway: &str) -> serde_json::Value {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/hooks.md")).expect("docs/hooks.md");
    let after = &doc[doc.find("<!-- hooks-config").expect("the hooks-config marker in docs/hooks.md")..];
    let start = after.find("```json").expect("a json block after the marker") + "```json".len();
    let block = &after[start..start + after[start..].find("```").unwrap()];
    let text = block
        .replace("/usr/local/bin/ctmigrate", common::EXE)
        .replace("\"br0\"", &format!("\"{bridge}\""))
        .replace("10.88.0.10/24", address)
        .replace("\"10.88.0.1\"", &format!("\"{gateway}\""));
    let parsed: serde_json::Value = serde_json::from_str(&text).expect("the documented block is JSON");
    parsed["hooks"].clone()
}

#[test]
fn documented_hooks_wire_plain_runc_and_the_container_migrates() {
    let Some(bed) = common::testbed("nh") else { return };
    let net = ContainerNetwork::create(&bed).expect("creating the network");
    let octets = net.container_ip.octets();
    let address = std::net::Ipv4Addr::new(octets[0], octets[1], octets[2], 20);
    let gateway = format!("{}.{}.{}.1", octets[0], octets[1], octets[2]);

    // A bundle from `runc spec` (a network namespace of its own) with the
    // documented hooks, run by plain runc in the source host's namespace.
    let id = format!("hooked-{}", bed.tag);
    let id = id.as_str();
    let bundle = bed.dir.join("src-bundles").join(id);
    std::fs::create_dir_all(&bundle).unwrap();
    build_bundle(&bed.runc_binary, &bundle, &Workload::Echo { port: ECHO_PORT }).unwrap();
    let config_path = bundle.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    cfg["hooks"] = documented_hooks(&net.bridge, &format!("{address}/24"), &gateway);
    std::fs::write(&config_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    // The container inherits runc's stdio: a pipe would never close.
    let log = bed.dir.join("hooked-runc.log");
    let run = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", net.src))
        .arg(&bed.runc_binary)
        .arg("--root")
        .arg(&bed.src_runc.root)
        .arg("--log")
        .arg(&log)
        .args(["run", "-d", "--bundle"])
        .arg(&bundle)
        .arg(id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(run.success(), "runc run with the documented hooks: {}", std::fs::read_to_string(&log).unwrap_or_default());
    let _src = FixtureContainer { runc: bed.src_runc.clone(), id: id.into(), bundle: bundle.clone() };

    // Reachable at its address from the client, through the source host.
    let stream = common::wait_for(Duration::from_secs(10), || connect_from(&net.client, SocketAddr::from((address, ECHO_PORT))).ok())
        .expect("the hooked container is not reachable at its address");
    drop(stream);
    let host_end = runtime_hooks::host_end(id);
    let in_src = |name: &str| {
        std::process::Command::new("ip").args(["-n", &net.src, "link", "show", "dev", name]).output().unwrap().status.success()
    };
    assert!(in_src(&host_end), "attach made no host end {host_end} in the source host");

    // It migrates: its own namespace holds eth0, so ctmigrate records it
    // and the receiver rebuilds it, dropping the hooks it has replaced.
    let client = {
        let addr = SocketAddr::from((address, ECHO_PORT));
        let stream = connect_from(&net.client, addr).unwrap();
        EchoClient::adopt(stream)
    };
    client.assert_flowing(1_000, Duration::from_secs(20), "before migrating");
    let port = common::port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--bridge", &net.bridge], &[]).unwrap();
    let sent = bed.run_sender(id, port, &["--tcp-established"], &[]).unwrap();
    assert_eq!(sent.code, Some(0), "migration failed: {}", sent.stderr);
    receiver.wait(Duration::from_secs(30));
    assert!(!in_src(&host_end), "the source's host end outlived the migration");
    let dst_cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(bed.dst_bundles().join(id).join("config.json")).unwrap()).unwrap();
    let poststop = dst_cfg["hooks"]["poststop"].to_string();
    assert!(dst_cfg["hooks"]["createRuntime"].is_null() && poststop.contains("remove-netns") && !poststop.contains("detach"), "{}", dst_cfg["hooks"]);
    net.route_via(Side::Destination).unwrap();
    client.assert_flowing(3_000, Duration::from_secs(90), "after migrating");
    client.finish();

    // Deleting the migrated container removes its namespace and host end.
    drop(bed.dst_container(id));
    assert_no_network_leftovers(&net, id, true, "after the hooked container was deleted");
}

#[test]
fn killed_sides_leave_the_network_as_it_was() {
    let Some(e) = echo_bed("nk") else { return };
    let (bed, net, id) = (&e.bed, &e.net, e.id.as_str());
    let client = EchoClient::connect(net);
    client.assert_flowing(1_000, Duration::from_secs(20), "before migrating");
    let kill = |pid: u32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let frozen = || common::wait_for(Duration::from_secs(20), || (common::frozen_state(bed, id) == "FROZEN").then_some(()));

    // The sender is killed while the source is frozen and its network
    // locked: the guard thaws the source and unlocks its network.
    let port = common::port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--bridge", &net.bridge], &[]).unwrap();
    let mut cmd = bed.send_command(id, port, &["--tcp-established"]);
    cmd.env("CTMIGRATE_FAILPOINTS", "sender-after-freeze=sleep:60000");
    let mut sender = migration_testbed::ChildProcess::spawn(cmd).unwrap();
    frozen().expect("the sender never froze the source");
    assert!(container_network::lock::is_locked(&container_network::Netns::Path(net.container_netns_path())).unwrap(), "frozen but not locked");
    kill(sender.child.id());
    let _ = sender.wait(Duration::from_secs(5));
    common::wait_for(Duration::from_secs(20), || (common::frozen_state(bed, id) == "THAWED").then_some(())).expect("the guard did not thaw");
    receiver.wait(Duration::from_secs(60));
    client.assert_flowing(1_000, Duration::from_secs(60), "after the sender was killed");
    assert_no_network_leftovers(net, id, true, "after the sender was killed");
    common::assert_clean(bed, id);

    // The receiver is killed mid-transfer: the source resumes; what the
    // receiver built stays until the next receiver starts, which sweeps it.
    let port = common::port();
    let mut receiver = bed.spawn_receiver(port, &["--once", "--bridge", &net.bridge], &[("CTMIGRATE_FAILPOINTS", "receiver-during-images=sleep:60000")]).unwrap();
    let mut sender = migration_testbed::ChildProcess::spawn(bed.send_command(id, port, &["--tcp-established"])).unwrap();
    frozen().expect("the sender never froze the source");
    kill(receiver.child.id());
    let _ = receiver.wait(Duration::from_secs(5));
    assert_eq!(sender.wait(Duration::from_secs(60)), Some(4), "{}", sender.stderr());
    client.assert_flowing(1_000, Duration::from_secs(60), "after the receiver was killed");
    let left = net.leftovers(id, true);
    assert!(left.iter().any(|l| l.contains(&format!("ctmigrate-{id}"))), "expected the killed receiver's namespace: {left:?}");
    let mut next = bed.spawn_receiver(common::port(), &["--bridge", &net.bridge], &[]).unwrap();
    assert_no_network_leftovers(net, id, true, "after the next receiver started");
    kill(next.child.id());
    let _ = next.wait(Duration::from_secs(5));
    common::assert_clean(bed, id);
    client.finish();
}

#[test]
fn activation_announces_the_moved_address() {
    let Some(bed) = common::testbed("na") else { return };
    let net = ContainerNetwork::create(&bed).expect("creating the network");
    let o = net.container_ip.octets();
    let address = std::net::Ipv4Addr::new(o[0], o[1], o[2], 30);
    let mac = "02:c7:00:00:aa:1e".to_string();
    let dst_host = format!("/run/netns/{}", net.dst);
    let bridge = net.bridge.clone();
    let id = format!("arp-{}", bed.tag);
    // Runs in a thread inside the destination host's namespace: the `ip`
    // commands the library spawns inherit it.
    let outcome = std::thread::spawn(move || -> Result<(), String> {
        let ns = std::fs::File::open(&dst_host).map_err(|e| e.to_string())?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        // An uplink, so the bridge keeps its carrier while the new host
        // end is down (a bridge without carrier flushes its neighbours).
        let uplink = format!("{id}u").replace("arp-", "");
        let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        let uplink_peer = format!("{uplink}p");
        ip(&["link", "add", &uplink, "type", "veth", "peer", "name", &uplink_peer]);
        ip(&["link", "set", &uplink_peer, "up"]);
        ip(&["link", "set", &uplink, "master", &bridge, "up"]);
        let neighbour = || {
            let out = std::process::Command::new("ip").args(["neigh", "show", &address.to_string(), "dev", &bridge]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let record = container_network::NetworkRecord {
            interfaces: vec![container_network::InterfaceRecord { name: "eth0".into(), mac: mac.clone(), mtu: 1500, addresses: vec![format!("{address}/24")] }],
            routes: vec![],
        };
        let built = container_network::DestinationNetwork::build(&record, &id, Some(&bridge)).map_err(|e| e.to_string())?;
        // The host believes the address is elsewhere (where it was). (Set
        // after the build: a bridge's first port changes its MAC, which
        // flushes its neighbours.)
        let stale = std::process::Command::new("ip")
            .args(["neigh", "replace", &address.to_string(), "lladdr", "02:00:00:00:00:01", "dev", &bridge, "nud", "stale"])
            .status()
            .unwrap();
        assert!(stale.success());
        // Updates within a second of the last are not overrides.
        std::thread::sleep(Duration::from_millis(1500));
        let before = neighbour();
        let result = built.activate().map_err(|e| e.to_string()).and_then(|()| {
            common::wait_for(Duration::from_secs(5), || neighbour().contains(&mac).then_some(()))
                .ok_or_else(|| format!("the neighbour entry was not updated: {}", neighbour()))
        });
        built.remove();
        ip(&["link", "del", &uplink]);
        assert!(before.contains("02:00:00:00:00:01"), "built but not yet active, and already announced: {before}");
        result
    })
    .join()
    .unwrap();
    outcome.unwrap();
    assert_no_network_leftovers(&net, &format!("arp-{}", bed.tag), true, "after remove");
}

/// One migration of the echo server on one L2 segment (the client and
/// both hosts; only ARP tells where the container's address lives), the
/// nudge on or off (its failpoint): the client's longest wait for an echo
/// across it, the sender's frozen time and the receiver's `tcp_nudged`.
fn shared_segment_gap(prefix: &str, mode: &[&str], nudged: bool) -> Option<(Duration, u64, Option<u64>)> {
    let bed = common::testbed(prefix)?;
    let net = ContainerNetwork::create_shared_segment(&bed).expect("creating the shared segment");
    let id = format!("{prefix}-echo-{}", bed.tag);
    let src = start_echo(&bed, &net, &id);
    let client = EchoClient::connect_request_response(&net);
    client.assert_flowing(50, Duration::from_secs(20), "before migrating");
    client.take_longest_gap();

    let port = common::port();
    let env: &[(&str, &str)] = if nudged { &[] } else { &[("CTMIGRATE_FAILPOINTS", "receiver-before-nudge=error")] };
    let mut receiver = bed.spawn_receiver(port, &["--once", "--bridge", &net.bridge], env).unwrap();
    let mut args = vec!["--tcp-established"];
    args.extend_from_slice(mode);
    let sent = bed.run_sender(&id, port, &args, &[]).unwrap();
    assert_eq!(sent.code, Some(0), "migration failed: {}", sent.stderr);
    assert_eq!(receiver.wait(Duration::from_secs(60)), Some(0), "receiver: {}", receiver.stderr());
    client.assert_flowing(50, Duration::from_secs(60), "after migrating");
    let gap = client.take_longest_gap();
    let frozen_ms = sent.result().and_then(|r| r["frozen_ms"].as_u64()).expect("the sender's frozen_ms");
    let tcp_nudged = receiver.result().and_then(|r| r["tcp_nudged"].as_u64());
    eprintln!(
        "{prefix} {mode:?} {}: client's longest gap {} ms, frozen {frozen_ms} ms (target {} ms); tcp_nudged {tcp_nudged:?}",
        if nudged { "nudged" } else { "not nudged" },
        gap.as_millis(),
        frozen_ms * 3 / 2 + 100
    );
    client.finish();
    drop(src);
    drop(bed.dst_container(&id));
    std::fs::remove_dir_all(bed.dst_bundles().join(&id)).expect("the committed bundle");
    assert_no_network_leftovers(&net, &id, false, "after the nudge measurement");
    common::assert_clean(&bed, &id);
    Some((gap, frozen_ms, tcp_nudged))
}

/// The receiver nudges the peers of the moved connections once the copy
/// runs (the result says how many), and not when told not to (its
/// failpoint); the connection keeps either way. Whether the nudge makes
/// a backed-off peer retransmit at once is container-network's
/// `root_nudge` test; the client's gaps here are reported, and measured
/// against the issue's target by `bench_client_gap_on_a_shared_segment`.
#[test]
fn moved_connections_peers_are_nudged_on_a_shared_segment() {
    let Some((_, _, plain_nudged)) = shared_segment_gap("nudge", &[], false) else { return };
    assert_eq!(plain_nudged, None, "the failpoint should have stopped the nudge");
    let (_, _, nudged) = shared_segment_gap("nudge", &[], true).expect("the testbed ran once");
    assert_eq!(nudged, Some(1), "the client's connection should have been nudged");
}

/// Benchmark (the issue's target, reported, not asserted): the client's
/// longest gap against 1.5 x frozen + 100 ms on the shared segment, for
/// stop-copy and post-copy, nudged and not, `CTMIGRATE_BENCH_RUNS` times.
/// `cargo test --release --test network -- --ignored bench_client_gap --nocapture`
#[test]
#[ignore]
fn bench_client_gap_on_a_shared_segment() {
    let runs: usize = std::env::var("CTMIGRATE_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let mut rows = Vec::new();
    for run in 0..runs {
        for (name, mode) in [("stop-copy", &[][..]), ("post-copy", &["--mode", "postcopy"][..])] {
            for nudged in [false, true] {
                let Some((gap, frozen, _)) = shared_segment_gap("cgap", mode, nudged) else { return };
                rows.push((run, name, nudged, gap.as_millis() as u64, frozen));
            }
        }
    }
    println!("| run | mode | nudge | client gap ms | frozen ms | gap / (1.5 x frozen + 100) |");
    println!("|---|---|---|---|---|---|");
    for (run, name, nudged, gap, frozen) in rows {
        let target = frozen * 3 / 2 + 100;
        println!("| {run} | {name} | {} | {gap} | {frozen} | {:.2} |", if nudged { "yes" } else { "no" }, gap as f64 / target as f64);
    }
}
