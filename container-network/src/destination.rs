//! Rebuilding recorded interfaces: one veth pair per interface, its
//! container end (same name, MAC, MTU, addresses) in the namespace, its
//! host end on a bridge. The receiver builds the whole namespace before the
//! source is frozen and keeps the host ends down until the container is
//! restored, so that no packet meets a namespace without its sockets (the
//! kernel would reset the connection).

use std::path::PathBuf;

use crate::record::{InterfaceRecord, NetworkRecord, RouteRecord};
use crate::{ip, ip_json, Netns, NetworkError};

/// Checks that `bridge` exists here and is a Linux bridge.
pub fn check_bridge(bridge: &str) -> Result<(), NetworkError> {
    crate::record::validate_ifname(bridge)?;
    let links = ip_json(None, &["-d", "link", "show", "dev", bridge]).map_err(|_| {
        NetworkError::Bridge(format!("bridge `{bridge}` does not exist on this host: create it (ip link add {bridge} type bridge) or name another with --bridge"))
    })?;
    let kind = links.first().and_then(|l| l["linkinfo"]["info_kind"].as_str()).unwrap_or("");
    if kind != "bridge" {
        return Err(NetworkError::Bridge(format!("`{bridge}` is not a bridge (it is a `{}` link): name a bridge with --bridge", if kind.is_empty() { "plain" } else { kind })));
    }
    Ok(())
}

/// Creates the veth pair for `iface`: `host_end` here (on `bridge`, up if
/// `host_up`), the other end inside `netns` with the recorded name, MAC,
/// MTU and addresses, up. On failure the pair is removed again.
pub fn plumb_interface(netns: &Netns, iface: &InterfaceRecord, host_end: &str, bridge: &str, host_up: bool) -> Result<(), NetworkError> {
    let target = netns.ip_target().ok_or_else(|| NetworkError::Invalid(format!("{} is neither a named namespace nor a process", netns.path().display())))?;
    let mtu = iface.mtu.to_string();
    ip(None, &["link", "add", host_end, "mtu", &mtu, "type", "veth", "peer", "name", &iface.name, "address", &iface.mac, "mtu", &mtu, "netns", &target])?;
    let configure = || -> Result<(), NetworkError> {
        ip(None, &["link", "set", host_end, "master", bridge])?;
        for a in &iface.addresses {
            // No duplicate address detection: the address is moving, not new.
            let mut args = vec!["addr", "add", a.as_str(), "dev", &iface.name];
            if a.contains(':') {
                args.push("nodad");
            }
            ip(Some(netns), &args)?;
        }
        ip(Some(netns), &["link", "set", &iface.name, "up"])?;
        if host_up {
            ip(None, &["link", "set", host_end, "up"])?;
        }
        Ok(())
    };
    configure().inspect_err(|_| {
        let _ = ip(None, &["link", "del", host_end]);
    })
}

/// Adds `routes` inside `netns`.
pub fn add_routes(netns: &Netns, routes: &[RouteRecord]) -> Result<(), NetworkError> {
    for r in routes {
        let family = if r.family == 6 { "-6" } else { "-4" };
        let mut args = vec![family, "route", "add", r.destination.as_str()];
        if let Some(gw) = &r.gateway {
            args.extend(["via", gw.as_str()]);
        }
        // The host end is still down: the route would otherwise be refused
        // as unreachable.
        args.extend(["dev", r.device.as_str(), "onlink"]);
        ip(Some(netns), &args)?;
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
            for (index, iface) in record.interfaces.iter().enumerate() {
                let host_end = crate::host_ifname("ctm", id, index);
                plumb_interface(&built.netns, iface, &host_end, bridge.unwrap_or_default(), false)?;
                built.host_ends.push(host_end);
            }
            add_routes(&built.netns, &record.routes)
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
            match ip_json(Some(&netns), &["link", "show"]) {
                Ok(links) => {
                    for link in links {
                        let name = link["ifname"].as_str().unwrap_or("lo");
                        if name != "lo" {
                            if let Err(e) = ip(Some(&netns), &["link", "del", name]) {
                                first_error.get_or_insert(e);
                            }
                        }
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for index in 0..crate::record::MAX_INTERFACES {
            let h = crate::host_ifname("ctm", id, index);
            if link_exists(&h) {
                if let Err(e) = ip(None, &["link", "del", &h]) {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = netns.remove() {
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
        for h in &self.host_ends {
            ip(None, &["link", "set", h, "up"])?;
        }
        announce_all(&self.netns, &self.record)
    }

    /// Removes the host ends and the namespace. Safe to call twice.
    pub fn remove(&self) {
        for h in &self.host_ends {
            let _ = ip(None, &["link", "del", h]);
        }
        let _ = self.netns.remove();
    }
}

/// Deletes the recorded interfaces inside `netns` (a veth's peer goes with
/// it, and with the peer its bridge port). A namespace whose container is
/// gone can outlive it, held by orphaned TCP sockets still trying to close:
/// its links must not wait for that.
pub fn remove_interfaces(netns: &Netns, record: &NetworkRecord) -> Result<(), NetworkError> {
    for iface in &record.interfaces {
        ip(Some(netns), &["link", "del", &iface.name])?;
    }
    Ok(())
}

/// Whether link `name` exists in this process's namespace (/sys/class/net
/// shows the namespace sysfs was mounted in, which may be another).
pub fn link_exists(name: &str) -> bool {
    ip(None, &["link", "show", "dev", name]).is_ok()
}

/// Sends a gratuitous ARP for every IPv4 address of `record` from inside
/// `netns`.
pub fn announce_all(netns: &Netns, record: &NetworkRecord) -> Result<(), NetworkError> {
    for iface in &record.interfaces {
        let mac = crate::record::parse_mac(&iface.mac)?;
        let addrs: Vec<std::net::Ipv4Addr> = record.ipv4_addresses().into_iter().filter(|(n, _)| *n == iface.name).map(|(_, a)| a).collect();
        if !addrs.is_empty() {
            crate::arp::announce(&netns.path(), &iface.name, mac, &addrs)?;
        }
    }
    Ok(())
}
