//! Rebuilding recorded interfaces: one veth pair per interface, its
//! container end (same name, MAC, MTU, addresses) in the namespace, its
//! host end on a bridge. The receiver builds the whole namespace before the
//! source is frozen and keeps the host ends down until the container is
//! restored, so that no packet meets a namespace without its sockets (the
//! kernel would reset the connection).
//!
//! "Here" is the calling thread's network namespace: the host ends and the
//! bridge are looked for there.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::record::{parse_cidr, parse_mac, InterfaceRecord, NetworkRecord, RouteRecord};
use crate::rtnl::Rtnl;
use crate::{Netns, NetworkError};

/// Checks that `bridge` exists here and is a Linux bridge.
pub fn check_bridge(bridge: &str) -> Result<(), NetworkError> {
    crate::record::validate_ifname(bridge)?;
    let Some(link) = Rtnl::here()?.link(bridge)? else {
        return Err(NetworkError::Bridge(format!(
            "bridge `{bridge}` does not exist on this host: create it (ip link add {bridge} type bridge) or name another with --bridge"
        )));
    };
    match link.kind.as_deref() {
        Some("bridge") => Ok(()),
        kind => Err(NetworkError::Bridge(format!("`{bridge}` is not a bridge (it is a `{}` link): name a bridge with --bridge", kind.unwrap_or("plain")))),
    }
}

/// Creates the veth pair for `iface`: `host_end` here (on `bridge`, up if
/// `host_up`), the other end inside `netns` with the recorded name, MAC,
/// MTU and addresses, up. On failure the pair is removed again.
pub fn plumb_interface(netns: &Netns, iface: &InterfaceRecord, host_end: &str, bridge: &str, host_up: bool) -> Result<(), NetworkError> {
    let mut here = Rtnl::here()?;
    let bridge_index = here.index(bridge)?;
    plumb(&mut here, &mut Rtnl::open_in(netns)?, netns, iface, host_end, bridge_index, host_up)
}

/// [`plumb_interface`] over open sockets: `here`, and `inside` the
/// namespace.
fn plumb(here: &mut Rtnl, inside: &mut Rtnl, netns: &Netns, iface: &InterfaceRecord, host_end: &str, bridge_index: u32, host_up: bool) -> Result<(), NetworkError> {
    let mac = parse_mac(&iface.mac)?;
    here.add_veth(host_end, bridge_index, &iface.name, mac, iface.mtu, &netns.path())?;
    let mut configure = || -> Result<(), NetworkError> {
        let index = inside.index(&iface.name)?;
        for a in &iface.addresses {
            // No duplicate address detection: the address is moving, not new.
            let (addr, prefix) = parse_cidr(a)?;
            inside.add_address(index, &iface.name, addr, prefix)?;
        }
        inside.set_up(&iface.name)?;
        if host_up {
            here.set_up(host_end)?;
        }
        Ok(())
    };
    let result = configure();
    if result.is_err() {
        let _ = here.delete_link(host_end);
    }
    result
}

/// Adds `routes` inside `netns`.
pub fn add_routes(netns: &Netns, routes: &[RouteRecord]) -> Result<(), NetworkError> {
    if routes.is_empty() {
        return Ok(());
    }
    add_routes_with(&mut Rtnl::open_in(netns)?, routes)
}

fn add_routes_with(inside: &mut Rtnl, routes: &[RouteRecord]) -> Result<(), NetworkError> {
    let mut indexes = HashMap::new();
    for r in routes {
        let oif = match indexes.get(&r.device) {
            Some(i) => *i,
            None => {
                let i = inside.index(&r.device)?;
                indexes.insert(r.device.clone(), i);
                i
            }
        };
        let destination = if r.destination == "default" { None } else { Some(parse_cidr(&r.destination)?) };
        let gateway = match &r.gateway {
            Some(gw) => Some(gw.parse().map_err(|_| NetworkError::Invalid(format!("gateway `{gw}` is not an address")))?),
            None => None,
        };
        let via = r.gateway.as_deref().map(|g| format!(" via {g}")).unwrap_or_default();
        // The host end is still down: a route through a gateway would
        // otherwise be refused as unreachable (onlink).
        inside.add_route(r.family, destination, gateway, oif, &format!("{}{via} dev {}", r.destination, r.device))?;
    }
    Ok(())
}

/// A namespace built for an incoming container, and the host ends of its
/// veth pairs. Nothing is removed on drop: the owner calls [`remove`]
/// unless the migration committed.
///
/// [`remove`]: DestinationNetwork::remove
#[derive(Debug)]
pub struct DestinationNetwork {
    pub netns: Netns,
    pub host_ends: Vec<String>,
    record: NetworkRecord,
}

impl DestinationNetwork {
    /// The namespace name the receiver uses for container `id`.
    pub fn netns_name(id: &str) -> String {
        format!("ctmigrate-{id}")
    }

    /// Builds `record` in a new namespace named after `id`, host ends on
    /// `bridge` and down. On failure, whatever was made is removed.
    pub fn build(record: &NetworkRecord, id: &str, bridge: Option<&str>) -> Result<Self, NetworkError> {
        record.validate()?;
        if let Some(b) = bridge {
            check_bridge(b)?;
        } else if !record.is_empty() {
            return Err(NetworkError::Bridge(
                "the container has network interfaces, but this receiver has no bridge to attach them to: start `ctmigrate receive` with --bridge NAME".into(),
            ));
        }
        let netns = Netns::create_named(&Self::netns_name(id))?;
        let mut built = DestinationNetwork { netns, host_ends: Vec::new(), record: record.clone() };
        let result = (|| {
            if record.is_empty() {
                return Ok(());
            }
            let mut here = Rtnl::here()?;
            let mut inside = Rtnl::open_in(&built.netns)?;
            let bridge_index = here.index(bridge.unwrap_or_default())?;
            for (index, iface) in record.interfaces.iter().enumerate() {
                let host_end = crate::host_ifname("ctm", id, index);
                plumb(&mut here, &mut inside, &built.netns, iface, &host_end, bridge_index, false)?;
                built.host_ends.push(host_end);
            }
            add_routes_with(&mut inside, &record.routes)
        })();
        match result {
            Ok(()) => Ok(built),
            Err(e) => {
                built.remove();
                Err(e)
            }
        }
    }

    /// Removes what [`build`](Self::build) made for container `id`, found
    /// by name: for the receiver's poststop hook, and for sweeping up after
    /// a receiver that died.
    pub fn remove_for(id: &str) -> Result<(), NetworkError> {
        let netns = Netns::Named(Self::netns_name(id));
        // Every step is tried whatever the one before did: a namespace
        // left behind is the worst outcome here.
        let mut first_error = None;
        if netns.exists() {
            // From inside: the hook may run in another namespace than the
            // host ends, and the namespace itself may outlive its last
            // process (orphaned sockets), keeping its links alive.
            let deleted = Rtnl::open_in(&netns).and_then(|mut inside| {
                for link in inside.links()? {
                    if link.name != "lo" {
                        if let Err(e) = inside.delete_link(&link.name) {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                Ok(())
            });
            if let Err(e) = deleted {
                first_error.get_or_insert(e);
            }
        }
        match Rtnl::here() {
            Ok(mut here) => {
                for index in 0..crate::record::MAX_INTERFACES {
                    let h = crate::host_ifname("ctm", id, index);
                    if let Err(e) = delete_if_present(&mut here, &h) {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = netns.remove() {
            first_error.get_or_insert(e);
        }
        // A pod leader's IPC namespace (see crate::ipcns) goes with it.
        if let Err(e) = crate::ipcns::remove_ipc_namespace(id) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The network [`build`](Self::build) made for container `id` from
    /// `record`, found by name: for a process other than the one that
    /// built it (a restarted receiver finishing a committed migration).
    pub fn existing(record: &NetworkRecord, id: &str) -> Self {
        DestinationNetwork {
            netns: Netns::Named(Self::netns_name(id)),
            host_ends: (0..record.interfaces.len()).map(|index| crate::host_ifname("ctm", id, index)).collect(),
            record: record.clone(),
        }
    }

    pub fn netns_path(&self) -> PathBuf {
        self.netns.path()
    }

    /// The container runs: bring the host ends up and announce the moved
    /// IPv4 addresses from inside the namespace.
    pub fn activate(&self) -> Result<(), NetworkError> {
        let mut here = Rtnl::here()?;
        for h in &self.host_ends {
            here.set_up(h)?;
        }
        // What the restored sockets sent while the host ends were down
        // (a repaired socket's window probe) started address resolutions
        // that failed and retry only every second: forgotten, the next
        // packet to a peer asks at once.
        Rtnl::open_in(&self.netns)?.flush_neighbours()?;
        announce_all(&self.netns, &self.record)
    }

    /// Removes the host ends and the namespace. Safe to call twice.
    pub fn remove(&self) {
        if let Ok(mut here) = Rtnl::here() {
            for h in &self.host_ends {
                let _ = here.delete_link(h);
            }
        }
        let _ = self.netns.remove();
    }
}

/// Deletes the recorded interfaces inside `netns` (a veth's peer goes with
/// it, and with the peer its bridge port). A namespace whose container is
/// gone can outlive it, held by orphaned TCP sockets still trying to close:
/// its links must not wait for that.
pub fn remove_interfaces(netns: &Netns, record: &NetworkRecord) -> Result<(), NetworkError> {
    if record.interfaces.is_empty() {
        return Ok(());
    }
    let mut inside = Rtnl::open_in(netns)?;
    for iface in &record.interfaces {
        inside.delete_link(&iface.name)?;
    }
    Ok(())
}

/// Whether link `name` exists here (/sys/class/net shows the namespace
/// sysfs was mounted in, which may be another).
pub fn link_exists(name: &str) -> bool {
    Rtnl::here().and_then(|mut here| here.link(name)).is_ok_and(|link| link.is_some())
}

/// Deletes link `name` here (a veth's peer goes with it).
pub fn delete_link(name: &str) -> Result<(), NetworkError> {
    Rtnl::here()?.delete_link(name)
}

/// Deletes link `name` if it is there.
fn delete_if_present(here: &mut Rtnl, name: &str) -> Result<(), NetworkError> {
    match here.delete_link(name) {
        Err(NetworkError::Netlink { errno: nix::errno::Errno::ENODEV, .. }) => Ok(()),
        other => other,
    }
}

/// Sends a gratuitous ARP for every IPv4 address of `record` from inside
/// `netns`.
pub fn announce_all(netns: &Netns, record: &NetworkRecord) -> Result<(), NetworkError> {
    let mut interfaces = Vec::new();
    for iface in &record.interfaces {
        let mac = crate::record::parse_mac(&iface.mac)?;
        let addrs: Vec<std::net::Ipv4Addr> = record.ipv4_addresses().into_iter().filter(|(n, _)| *n == iface.name).map(|(_, a)| a).collect();
        if !addrs.is_empty() {
            interfaces.push((iface.name.clone(), mac, addrs));
        }
    }
    if interfaces.is_empty() {
        return Ok(());
    }
    crate::arp::announce_many(&netns.path(), interfaces)
}
