//! A container's own network namespace with only loopback (runc's
//! default). runc restores with CRIU's `empty_ns` for the network, so a
//! namespace CRIU dumped came back bare, loopback down. ctmigrate makes the
//! destination's namespace itself, loopback up, and reports what the
//! source's held beyond a new one's, which is not carried.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use migration_testbed::FixtureContainer;

fn counter(bed: &Testbed, name: &str) -> (FixtureContainer, String, String) {
    let id = format!("{name}-{}", bed.tag);
    let src = bed.start_fixture(&id, &Workload::Counter).unwrap();
    let (token, _) = counter_at_least(&src.rootfs(), 5);
    (src, id, token)
}

fn init_pid(runc: &container_runtime::Runc, id: &str) -> i32 {
    runc.state(id).unwrap().pid
}

/// `args` run in the network namespace of process `pid`.
fn in_netns_of(pid: i32, program: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter").arg(format!("--net=/proc/{pid}/ns/net")).arg("--").arg(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_inode(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap())
}

/// IPv4 addresses on loopback, as `ip -j addr` lists them.
fn loopback_ipv4(pid: i32) -> Vec<String> {
    let links: Vec<serde_json::Value> = serde_json::from_str(&in_netns_of(pid, "ip", &["-j", "-4", "addr", "show", "dev", "lo"])).unwrap();
    let up = links.iter().all(|l| l["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    assert!(up, "loopback is down: {links:?}");
    links.iter().flat_map(|l| l["addr_info"].as_array().unwrap().iter().map(|a| a["local"].as_str().unwrap().to_string())).collect()
}

fn finish(bed: &Testbed, dest_id: &str) {
    let dst = bed.dst_container(dest_id);
    dst.runc.kill(&dst.id, "KILL").unwrap();
    wait_for(Duration::from_secs(5), || (dst.runc.state(&dst.id).ok()?.status == "stopped").then_some(()));
    dst.runc.delete_force(&dst.id).unwrap();
}

#[test]
fn a_loopback_namespace_as_new_is_made_anew_on_the_destination() {
    let Some(bed) = testbed("lbn") else { return };
    let (src, id, token) = counter(&bed, "lbnew");
    let dest_id = format!("{id}-d");
    let sent = migrate_ok(&bed, &id, &dest_id);
    let result = sent.result().unwrap();
    assert_eq!(result["network"], "made anew by ctmigrate: loopback only, as new", "{result}");

    // The container runs in the namespace the receiver made (not one CRIU
    // restored), with loopback up and its usual address.
    let dst = bed.dst_container(&dest_id);
    let pid = init_pid(&dst.runc, &dst.id);
    let named = format!("/run/netns/ctmigrate-{dest_id}");
    assert_eq!(netns_inode(&format!("/proc/{pid}/ns/net")), netns_inode(&named));
    assert_eq!(loopback_ipv4(pid), vec!["127.0.0.1".to_string()]);
    let (_, now) = read_counter(&dst.rootfs()).unwrap();
    assert_counting_on(&dst.rootfs(), &token, now);
    drop(src);

    // The namespace goes with the container.
    finish(&bed, &dest_id);
    wait_for(Duration::from_secs(10), || (!std::path::Path::new(&named).exists()).then_some(()))
        .unwrap_or_else(|| panic!("{named} outlived the container"));
}

#[test]
fn what_a_loopback_namespace_held_beyond_a_new_one_is_reported_not_carried() {
    let Some(bed) = testbed("lbs") else { return };
    let (_src, id, token) = counter(&bed, "lbstate");
    let pid = init_pid(&bed.src_runc, &id);
    // From the host: the container itself cannot (no CAP_NET_ADMIN).
    in_netns_of(pid, "ip", &["addr", "add", "127.0.0.7/8", "dev", "lo"]);

    let dest_id = format!("{id}-d");
    let sent = migrate_ok(&bed, &id, &dest_id);
    let result = sent.result().unwrap();
    assert_eq!(result["network"], "made anew by ctmigrate: loopback only; not carried: addresses, routes-ipv4", "{result}");
    let warned = sent.events.iter().any(|e| e["event"] == "warning" && e["message"].as_str().unwrap_or("").contains("differs from a new one in addresses"));
    assert!(warned, "no warning among {:?}", sent.events);

    // The destination has a working loopback, without the extra address.
    let dst = bed.dst_container(&dest_id);
    let pid = init_pid(&dst.runc, &dst.id);
    assert_eq!(loopback_ipv4(pid), vec!["127.0.0.1".to_string()]);
    let (_, now) = read_counter(&dst.rootfs()).unwrap();
    assert_counting_on(&dst.rootfs(), &token, now);
    finish(&bed, &dest_id);
}
