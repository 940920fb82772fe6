//! Which containers must move together: those that share a network
//! namespace (a named one they all join, or one of them owns and the
//! others join by `/proc/PID/ns/net`) form a pod, moved as one unit (see
//! [`crate::source::pod`]); those that share an IPC namespace are kept
//! together too: they move as a pod when they all share one IPC namespace
//! and either one network namespace (as a Kubernetes pod's containers do)
//! or one network namespace each (its System V objects move with it, see
//! `container_network::ipcns`); otherwise they stay, all of them, with a
//! reason. A unit is never split.
//!
//! Namespaces are told apart by their inode (`/proc/PID/ns/KIND`); the
//! host's own (those of pid 1) join nobody together.

use std::collections::{BTreeMap, BTreeSet};

/// The inode of `pid`'s namespace of `kind` (`net`, `ipc`).
pub fn namespace_of(pid: i32, kind: &str) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).ok()?;
    // "net:[4026531840]"
    let text = link.to_string_lossy();
    text.strip_prefix(&format!("{kind}:["))?.strip_suffix(']')?.parse().ok()
}

/// Processes in `pid`'s namespace of `kind` that are none of `inside`
/// (with their command names); none when that namespace is the host's.
pub fn namespace_sharers(pid: i32, kind: &str, inside: &dyn Fn(i32) -> bool) -> Vec<Sharer> {
    let Some(ns) = namespace_of(pid, kind) else { return Vec::new() };
    if namespace_of(1, kind) == Some(ns) {
        return Vec::new();
    }
    let Ok(all) = procfs::process::all_processes() else { return Vec::new() };
    all.filter_map(Result::ok)
        .filter(|p| p.pid != pid && namespace_of(p.pid, kind) == Some(ns))
        .filter(|p| !inside(p.pid))
        // A process that ended meanwhile (a container's short-lived child
        // whose cgroup could no longer be read) shares nothing.
        .filter_map(|p| {
            let comm = p.stat().ok()?.comm;
            (namespace_of(p.pid, kind) == Some(ns)).then_some((p.pid, comm))
        })
        .collect()
}

/// Whether a process belongs to one of the containers whose init
/// processes are `inits`: it is in one of their cgroups (or below). By
/// cgroup, not by a list of pids: a container's short-lived processes
/// come and go while it is looked at.
pub fn in_cgroups_of(inits: &[i32]) -> impl Fn(i32) -> bool {
    let cgroups: Vec<Vec<String>> = inits.iter().filter_map(|&pid| cgroup_paths(pid)).collect();
    move |pid| {
        let Some(own) = cgroup_paths(pid) else { return false };
        cgroups.iter().any(|c| c.len() == own.len() && c.iter().zip(&own).all(|(container, own)| own.starts_with(container.as_str())))
    }
}

/// A process's cgroup in each hierarchy (`/proc/PID/cgroup`, in order).
fn cgroup_paths(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    Some(text.lines().filter_map(|l| l.splitn(3, ':').nth(2)).map(str::to_string).collect())
}

/// A process sharing a namespace: its pid and command name.
pub type Sharer = (i32, String);

/// A running container, as grouping needs it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub init_pid: i32,
    /// Its network namespace is a path it joins, not one it made.
    pub joins_network: bool,
}

/// How a set of containers moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// A container alone.
    Single(String),
    /// Containers that move as one. With `shared_net`, they share one
    /// network namespace, which `leader` records, locks and moves (the one
    /// that made it, else the first by id). With `shared_ipc`, they all
    /// share one IPC namespace (with one network namespace: a Kubernetes
    /// pod's shape; without, each has a network namespace of its own),
    /// which the destination makes anew for them when `leader` arrives.
    Pod { leader: String, members: Vec<String>, shared_net: bool, shared_ipc: bool },
    /// Containers that cannot move, and why; all stay.
    Stays { members: Vec<String>, reason: String },
}

impl Unit {
    pub fn members(&self) -> Vec<String> {
        match self {
            Unit::Single(id) => vec![id.clone()],
            Unit::Pod { members, .. } | Unit::Stays { members, .. } => members.clone(),
        }
    }
}

/// Groups `containers` into the units they move as (in the order of their
/// first member). `ns` gives a container's namespace inode of a kind
/// (`namespace_of` on its init, or a fake), `host` the host's, and
/// `outsiders` the processes sharing a namespace that are none of the
/// group's containers.
pub fn group(
    containers: &[Member],
    ns: &dyn Fn(&Member, &str) -> Option<u64>,
    host: &dyn Fn(&str) -> Option<u64>,
    outsiders: &dyn Fn(&[&Member], &str) -> Vec<Sharer>,
) -> Vec<Unit> {
    // Union-find over the containers, joined by shared net or ipc inodes.
    let mut parent: Vec<usize> = (0..containers.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut shared_ipc = BTreeSet::new();
    for kind in ["net", "ipc"] {
        let mut first_of: BTreeMap<u64, usize> = BTreeMap::new();
        for (i, c) in containers.iter().enumerate() {
            let Some(inode) = ns(c, kind) else { continue };
            if host(kind) == Some(inode) {
                continue;
            }
            match first_of.get(&inode) {
                None => {
                    first_of.insert(inode, i);
                }
                Some(&j) => {
                    if kind == "ipc" {
                        shared_ipc.insert(i);
                        shared_ipc.insert(j);
                    }
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a] = b;
                }
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut order = Vec::new();
    for i in 0..containers.len() {
        let r = root(&mut parent, i);
        if !groups.contains_key(&r) {
            order.push(r);
        }
        groups.entry(r).or_default().push(i);
    }
    order
        .into_iter()
        .map(|r| {
            let idx = &groups[&r];
            let members: Vec<&Member> = idx.iter().map(|&i| &containers[i]).collect();
            let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
            for (kind, what) in [("net", "network"), ("ipc", "IPC")] {
                if let Some((pid, comm)) = outsiders(&members, kind).into_iter().next() {
                    let who = if ids.len() == 1 { format!("`{}`", ids[0]) } else { format!("the pod {}", ids.join(", ")) };
                    return Unit::Stays {
                        members: ids,
                        reason: format!("{who} shares its {what} namespace with a process that is none of the containers moved (pid {pid}, {comm}): moving it would take the namespace from that process"),
                    };
                }
            }
            if ids.len() == 1 {
                return Unit::Single(ids[0].clone());
            }
            let one = |kind: &str| {
                let first = ns(members[0], kind);
                first.is_some() && host(kind) != first && members.iter().all(|m| ns(m, kind) == first)
            };
            let shares_ipc = idx.iter().any(|i| shared_ipc.contains(i));
            let shared_net = one("net");
            if shares_ipc {
                // One IPC namespace, and one network namespace or one each.
                let own_networks = {
                    let nets: Vec<u64> = members.iter().filter_map(|m| ns(m, "net")).filter(|n| Some(*n) != host("net")).collect();
                    nets.iter().collect::<BTreeSet<_>>().len() == nets.len()
                };
                if !one("ipc") || !(shared_net || own_networks) {
                    return Unit::Stays {
                        reason: format!(
                            "{} share an IPC namespace, but not as one pod: ctmigrate moves containers sharing one IPC namespace with one network namespace (as a Kubernetes pod does) or with a network namespace each",
                            ids.join(", ")
                        ),
                        members: ids,
                    };
                }
            }
            let leader = members.iter().find(|m| shared_net && !m.joins_network).unwrap_or(&members[0]).id.clone();
            Unit::Pod { leader, members: ids, shared_net, shared_ipc: shares_ipc }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, joins: bool) -> Member {
        Member { id: id.into(), init_pid: 0, joins_network: joins }
    }

    /// Containers with made-up namespaces: net and ipc inode per id.
    fn grouped(list: &[(&str, bool, u64, u64)], outsider_in: Option<u64>) -> Vec<Unit> {
        let members: Vec<Member> = list.iter().map(|(id, joins, ..)| member(id, *joins)).collect();
        let table: BTreeMap<String, (u64, u64)> = list.iter().map(|(id, _, n, i)| (id.to_string(), (*n, *i))).collect();
        let ns = |m: &Member, kind: &str| table.get(&m.id).map(|(n, i)| if kind == "net" { *n } else { *i });
        let host = |_: &str| Some(1);
        let outsiders = |ms: &[&Member], kind: &str| {
            let inode = ns(ms[0], kind);
            if kind == "net" && inode.is_some() && inode == outsider_in {
                vec![(4242, "intruder".to_string())]
            } else {
                Vec::new()
            }
        };
        group(&members, &ns, &host, &outsiders)
    }

    #[test]
    fn containers_of_their_own_namespaces_move_alone() {
        let units = grouped(&[("a", false, 10, 20), ("b", false, 11, 21), ("h", false, 1, 1), ("h2", false, 1, 1)], None);
        assert_eq!(units, ["a", "b", "h", "h2"].map(|i| Unit::Single(i.into())));
    }

    #[test]
    fn a_shared_network_namespace_makes_a_pod_led_by_its_maker() {
        let units = grouped(&[("app", true, 10, 20), ("solo", false, 12, 22), ("pause", false, 10, 21), ("side", true, 10, 23)], None);
        assert_eq!(
            units,
            vec![
                Unit::Pod { leader: "pause".into(), members: vec!["app".into(), "pause".into(), "side".into()], shared_net: true, shared_ipc: false },
                Unit::Single("solo".into())
            ]
        );
        // All joining a named namespace: the first leads.
        let units = grouped(&[("x", true, 10, 20), ("y", true, 10, 21)], None);
        assert_eq!(units, vec![Unit::Pod { leader: "x".into(), members: vec!["x".into(), "y".into()], shared_net: true, shared_ipc: false }]);
    }

    #[test]
    fn a_shared_ipc_namespace_moves_with_one_network_namespace_or_one_each() {
        // Each its own network: a pod of the IPC namespace alone.
        let units = grouped(&[("a", false, 10, 20), ("b", false, 11, 20), ("c", false, 12, 22)], None);
        assert_eq!(units[0], Unit::Pod { leader: "a".into(), members: vec!["a".into(), "b".into()], shared_net: false, shared_ipc: true });
        assert_eq!(units[1], Unit::Single("c".into()));
        // Two share a network, the third shares only their IPC: it stays.
        let units = grouped(&[("a", false, 10, 20), ("b", true, 10, 20), ("c", false, 12, 20)], None);
        assert!(matches!(&units[0], Unit::Stays { members, reason } if members.len() == 3 && reason.contains("IPC")), "{units:?}");
        // A Kubernetes pod: both shared; a pod that moves its IPC too.
        let units = grouped(&[("pause", false, 10, 20), ("app", true, 10, 20)], None);
        assert_eq!(units, vec![Unit::Pod { leader: "pause".into(), members: vec!["pause".into(), "app".into()], shared_net: true, shared_ipc: true }]);
        // One network, but a third member with an IPC namespace of its own.
        let units = grouped(&[("pause", false, 10, 20), ("app", true, 10, 20), ("side", true, 10, 21)], None);
        assert!(matches!(&units[0], Unit::Stays { members, .. } if members.len() == 3), "{units:?}");
    }

    #[test]
    fn a_namespace_shared_with_a_process_outside_keeps_its_containers() {
        let units = grouped(&[("a", true, 10, 20), ("b", true, 10, 21), ("c", false, 12, 22)], Some(10));
        assert!(matches!(&units[0], Unit::Stays { members, reason } if members.len() == 2 && reason.contains("pid 4242")), "{units:?}");
        assert_eq!(units[1], Unit::Single("c".into()));
    }

    #[test]
    fn this_process_namespaces_and_cgroup_are_read() {
        let me = std::process::id() as i32;
        assert!(namespace_of(me, "net").is_some());
        assert!(namespace_of(me, "nonsense").is_none());
        // A child started now is in this process's cgroup.
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert!(in_cgroups_of(&[me])(child.id() as i32));
        assert!(!in_cgroups_of(&[])(child.id() as i32));
        let _ = child.kill();
        let _ = child.wait();
    }
}
