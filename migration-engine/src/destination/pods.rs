//! Pods on the destination: each member arrives in a session of its own,
//! and this registry, shared by the receiver's sessions, makes them one
//! unit:
//!
//! * the leader's session is admitted first and builds the namespace
//!   (its manifest carries the record); a member is admitted only while
//!   its pod's leader is, and is restored into the leader's namespace;
//! * the pod's fate is decided once, by whichever comes first: a member's
//!   Commit commits every member (one whose connection is lost before its
//!   own Commit arrives is then committed all the same), a member's
//!   failure before that aborts every member (a later Commit is refused).
//!
//! The pod's namespaces (network and, if its members share one, IPC) are
//! built by the leader's session and belong to the pod, not to it: they
//! go when the last member's session ends ([`PodSeat`]), so a leader that
//! fails cannot pull them from under a member still restoring into them.
//! The network stays if the pod was committed (it is the leader's copy's
//! then, removed by its poststop hook); the IPC namespace's file goes
//! either way (the restored tasks hold the namespace itself).
//!
//! A commit is journalled (`pod-ID.committed`) before any member acts on
//! it: a receiver killed between two members' commits leaves the later
//! one's entry short of its own Commit, and the next start's recovery
//! (`resolve::recover_destination`) finds the pod committed and lets that
//! copy run too. An abort needs no record: without one, every member's
//! copy is removed, as for any migration.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_network::NetworkRecord;
use migration_protocol::PodWire;

use super::host::DestinationHost;

/// What became of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Committed,
    Aborted,
}

#[derive(Debug)]
struct PodEntry {
    leader: String,
    members: Vec<String>,
    decision: Option<Decision>,
    /// The leader's session still stands (its namespace exists).
    leader_admitted: bool,
    /// Members' sessions admitted and not yet ended.
    open_sessions: usize,
    /// What the leader built for the pod, removed after the last session.
    namespaces: PodNamespaces,
    /// Held by a member's restore while it runs: members sharing an IPC
    /// namespace are restored one at a time (the first makes its System V
    /// objects, the others find them there; CRIU patch 0006).
    restore_turn: Arc<Mutex<()>>,
    since: Instant,
}

/// The namespaces a pod's leader built on this host.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PodNamespaces {
    pub network: Option<NetworkRecord>,
    /// An IPC namespace made for the pod (container-network's `ipcns`).
    pub ipc: bool,
}

/// What the last session of a pod leaves to remove.
#[derive(Debug, PartialEq)]
pub(crate) struct PodLeftovers {
    pub leader: String,
    pub namespaces: PodNamespaces,
    pub committed: bool,
}

/// The receiver's pods, by id.
pub(crate) static PODS: PodRegistry = PodRegistry { pods: Mutex::new(BTreeMap::new()) };

pub(crate) struct PodRegistry {
    pods: Mutex<BTreeMap<String, PodEntry>>,
}

/// Longest a pod's entry is kept: a pod's members all arrive within one
/// sender's run.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The checks any pod in a manifest passes, whatever the registry holds.
pub(crate) fn validate(pod: &PodWire, dest_id: &str, has_network: bool) -> Result<(), String> {
    let id_ok = !pod.id.is_empty() && pod.id.len() <= 64 && pod.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !id_ok {
        return Err("the manifest's pod id must be 1 to 64 letters, digits or dashes".into());
    }
    if pod.members.len() < 2 || pod.members.len() > 64 {
        return Err(format!("a pod has 2 to 64 members; the manifest lists {}", pod.members.len()));
    }
    for m in &pod.members {
        container_runtime::validate_container_id(m).map_err(|e| format!("pod member: {e}"))?;
    }
    if !pod.members.iter().any(|m| m == dest_id) || !pod.members.contains(&pod.leader) {
        return Err("the manifest's pod does not list this container and its leader among its members".into());
    }
    if pod.members.iter().collect::<std::collections::BTreeSet<_>>().len() != pod.members.len() {
        return Err("the manifest's pod lists a member twice".into());
    }
    if !pod.shares_network && !pod.shares_ipc {
        return Err("the manifest's pod shares no namespace".into());
    }
    if pod.shares_network && (pod.leader == dest_id) != has_network {
        return Err("in a pod sharing a network namespace, the leader's manifest and only it carries the namespace".into());
    }
    Ok(())
}

impl PodRegistry {
    /// A member's session is admitted: the leader registers the pod, any
    /// other member must find it registered by the same leader, with the
    /// same members, and not decided.
    pub(crate) fn admit(&self, pod: &PodWire, dest_id: &str) -> Result<(), String> {
        let mut pods = self.pods.lock().unwrap();
        pods.retain(|_, e| e.since.elapsed() < FORGET_AFTER);
        if pod.leader == dest_id {
            if pods.contains_key(&pod.id) {
                return Err(format!("pod {} is already being received", pod.id));
            }
            pods.insert(
                pod.id.clone(),
                PodEntry {
                    leader: pod.leader.clone(),
                    members: pod.members.clone(),
                    decision: None,
                    leader_admitted: true,
                    open_sessions: 1,
                    namespaces: PodNamespaces::default(),
                    restore_turn: Arc::default(),
                    since: Instant::now(),
                },
            );
            return Ok(());
        }
        match pods.get_mut(&pod.id) {
            None => Err(format!("pod {}'s leader `{}` has not arrived: a pod's leader is sent first", pod.id, pod.leader)),
            Some(e) if e.leader != pod.leader || e.members != pod.members => Err(format!("pod {} was announced with other members", pod.id)),
            Some(e) if !e.leader_admitted || e.decision.is_some() => Err(format!("pod {} is no longer being received", pod.id)),
            Some(e) => {
                e.open_sessions += 1;
                Ok(())
            }
        }
    }

    /// The leader built `namespaces` for the pod: they are the pod's now.
    pub(crate) fn hold(&self, pod_id: &str, namespaces: PodNamespaces) {
        if let Some(e) = self.pods.lock().unwrap().get_mut(pod_id) {
            e.namespaces = namespaces;
        }
    }

    /// What a member's restore holds while it runs (see `restore_turn`).
    pub(crate) fn restore_turn(&self, pod_id: &str) -> Option<Arc<Mutex<()>>> {
        self.pods.lock().unwrap().get(pod_id).map(|e| e.restore_turn.clone())
    }

    /// A member's session ended; the last one gets what is to be removed.
    pub(crate) fn leave(&self, pod_id: &str) -> Option<PodLeftovers> {
        let mut pods = self.pods.lock().unwrap();
        let e = pods.get_mut(pod_id)?;
        e.open_sessions = e.open_sessions.saturating_sub(1);
        if e.open_sessions > 0 {
            return None;
        }
        Some(PodLeftovers {
            leader: e.leader.clone(),
            namespaces: std::mem::take(&mut e.namespaces),
            committed: e.decision == Some(Decision::Committed),
        })
    }

    /// The leader's session ended before the pod was decided: its
    /// namespace is gone, no member may come after it.
    pub(crate) fn leader_gone(&self, pod_id: &str) {
        if let Some(e) = self.pods.lock().unwrap().get_mut(pod_id) {
            e.leader_admitted = false;
        }
    }

    /// Proposes `wanted` for the pod; returns what was decided (the first
    /// proposal wins, and stays). A commit counts once `record` (the
    /// journal's) succeeded; if it fails, the pod is aborted instead.
    pub(crate) fn decide(&self, pod_id: &str, wanted: Decision, record: &dyn Fn() -> bool) -> Decision {
        let mut pods = self.pods.lock().unwrap();
        let Some(e) = pods.get_mut(pod_id) else {
            // Not registered (or forgotten): nothing committed it here.
            return Decision::Aborted;
        };
        if e.decision.is_none() {
            let recorded = wanted == Decision::Aborted || record();
            e.decision = Some(if recorded { wanted } else { Decision::Aborted });
        }
        e.decision.expect("just decided")
    }
}

/// A session's place in its pod, from its admission to its end: the last
/// one to go removes the pod's namespaces.
pub(crate) struct PodSeat {
    pub pod_id: String,
    /// This session's container leads the pod.
    pub leads: bool,
    /// The pod's members share an IPC namespace.
    pub shares_ipc: bool,
    host: Arc<dyn DestinationHost>,
}

impl PodSeat {
    /// Admits `dest_id` into `pod` in [`PODS`].
    pub(crate) fn take(pod: &PodWire, dest_id: &str, host: Arc<dyn DestinationHost>) -> Result<Self, String> {
        PODS.admit(pod, dest_id)?;
        Ok(Self { pod_id: pod.id.clone(), leads: pod.leader == dest_id, shares_ipc: pod.shares_ipc, host })
    }
}

impl Drop for PodSeat {
    fn drop(&mut self) {
        let Some(left) = PODS.leave(&self.pod_id) else { return };
        if let (false, Some(record)) = (left.committed, &left.namespaces.network) {
            self.host.remove_network(record, &left.leader);
        }
        if left.namespaces.ipc {
            self.host.remove_pod_ipc_namespace(&left.leader);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(id: &str) -> PodWire {
        PodWire { id: id.into(), leader: "pause".into(), members: vec!["pause".into(), "app".into()], shares_network: true, shares_ipc: false }
    }

    #[test]
    fn the_first_word_decides_the_pod() {
        let r = PodRegistry { pods: Mutex::new(BTreeMap::new()) };
        r.admit(&pod("p1"), "pause").unwrap();
        r.admit(&pod("p1"), "app").unwrap();
        let recorded = std::cell::Cell::new(0);
        let record = || {
            recorded.set(recorded.get() + 1);
            true
        };
        assert_eq!(r.decide("p1", Decision::Committed, &record), Decision::Committed);
        // A member whose connection was lost after that is committed too.
        assert_eq!(r.decide("p1", Decision::Aborted, &record), Decision::Committed);
        assert_eq!(recorded.get(), 1, "the commit is journalled once");
        r.admit(&pod("p2"), "pause").unwrap();
        assert_eq!(r.decide("p2", Decision::Aborted, &record), Decision::Aborted);
        assert_eq!(r.decide("p2", Decision::Committed, &record), Decision::Aborted, "a Commit after a failure is refused");
        assert_eq!(r.decide("unknown", Decision::Committed, &record), Decision::Aborted);
        // A commit that cannot be journalled aborts the pod.
        r.admit(&pod("p3"), "pause").unwrap();
        assert_eq!(r.decide("p3", Decision::Committed, &|| false), Decision::Aborted);
    }

    #[test]
    fn members_come_after_their_leader_and_only_while_it_stands() {
        let r = PodRegistry { pods: Mutex::new(BTreeMap::new()) };
        assert!(r.admit(&pod("p1"), "app").unwrap_err().contains("has not arrived"));
        r.admit(&pod("p1"), "pause").unwrap();
        assert!(r.admit(&pod("p1"), "pause").is_err(), "a pod is received once");
        let mut other = pod("p1");
        other.members.push("intruder".into());
        assert!(r.admit(&other, "intruder").is_err());
        r.leader_gone("p1");
        assert!(r.admit(&pod("p1"), "app").is_err());
    }

    #[test]
    fn the_pods_namespaces_go_with_its_last_session_and_its_network_only_if_aborted() {
        let r = PodRegistry { pods: Mutex::new(BTreeMap::new()) };
        let built = PodNamespaces { network: Some(NetworkRecord::default()), ipc: true };
        r.admit(&pod("p1"), "pause").unwrap();
        r.hold("p1", built.clone());
        r.admit(&pod("p1"), "app").unwrap();
        // The leader fails first: a member may still be restoring into them.
        r.decide("p1", Decision::Aborted, &|| true);
        r.leader_gone("p1");
        assert_eq!(r.leave("p1"), None);
        assert_eq!(r.leave("p1"), Some(PodLeftovers { leader: "pause".into(), namespaces: built.clone(), committed: false }));
        assert_eq!(r.leave("p1").map(|l| l.namespaces), Some(PodNamespaces::default()), "removed once");

        r.admit(&pod("p2"), "pause").unwrap();
        r.hold("p2", built.clone());
        r.admit(&pod("p2"), "app").unwrap();
        r.decide("p2", Decision::Committed, &|| true);
        assert_eq!(r.leave("p2"), None);
        assert_eq!(r.leave("p2"), Some(PodLeftovers { leader: "pause".into(), namespaces: built, committed: true }));
        assert_eq!(r.leave("unknown"), None);
    }

    #[test]
    fn a_pod_manifest_is_checked() {
        assert!(validate(&pod("p1"), "pause", true).is_ok());
        assert!(validate(&pod("p1"), "app", false).is_ok());
        assert!(validate(&pod("p1"), "app", true).is_err(), "only the leader carries the network");
        assert!(validate(&pod("p1"), "pause", false).is_err());
        // Sharing only an IPC namespace, each member carries its network.
        let ipc_only = PodWire { shares_network: false, shares_ipc: true, ..pod("p1") };
        assert!(validate(&ipc_only, "app", true).is_ok());
        assert!(validate(&ipc_only, "pause", false).is_ok());
        assert!(validate(&PodWire { shares_ipc: false, ..ipc_only }, "app", true).is_err(), "a pod shares something");
        assert!(validate(&pod("p1"), "stranger", false).is_err());
        assert!(validate(&pod("../x"), "app", false).is_err());
        let mut twice = pod("p1");
        twice.members.push("app".into());
        assert!(validate(&twice, "app", false).is_err());
        let mut bad = pod("p1");
        bad.members[1] = "a/b".into();
        assert!(validate(&bad, "pause", true).is_err());
    }
}
