//! What the sender records of a container's network, and how the receiver
//! checks it (it comes from the peer: every field is validated before any
//! of it reaches the kernel).

use std::net::IpAddr;

use migration_protocol::{InterfaceWire, NetworkWire, RouteWire};
use serde::{Deserialize, Serialize};

use crate::rtnl::{Address, Link, Route, Rtnl};
use crate::{Netns, NetworkError};

/// Most interfaces and routes a record may hold.
pub const MAX_INTERFACES: usize = 16;
pub const MAX_ROUTES: usize = 256;

/// A container's interfaces (other than loopback) and the routes added to
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub interfaces: Vec<InterfaceRecord>,
    pub routes: Vec<RouteRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceRecord {
    /// Name inside the container, e.g. `eth0`.
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub mtu: u32,
    /// `address/prefix`, IPv4 and global IPv6.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    /// `default` or `address/prefix`.
    pub destination: String,
    pub gateway: Option<String>,
    pub device: String,
    /// 4 or 6.
    pub family: u8,
}

// Conversions to and from the Manifest's wire format. Field for field and
// infallible: what comes from a peer is checked afterwards, by
// [`NetworkRecord::validate`]. The destructuring makes a field added on
// either side fail to compile here until the wire format is decided.

impl From<NetworkWire> for NetworkRecord {
    fn from(wire: NetworkWire) -> Self {
        let NetworkWire { interfaces, routes } = wire;
        NetworkRecord { interfaces: interfaces.into_iter().map(Into::into).collect(), routes: routes.into_iter().map(Into::into).collect() }
    }
}

impl From<NetworkRecord> for NetworkWire {
    fn from(record: NetworkRecord) -> Self {
        let NetworkRecord { interfaces, routes } = record;
        NetworkWire { interfaces: interfaces.into_iter().map(Into::into).collect(), routes: routes.into_iter().map(Into::into).collect() }
    }
}

impl From<InterfaceWire> for InterfaceRecord {
    fn from(wire: InterfaceWire) -> Self {
        let InterfaceWire { name, mac, mtu, addresses } = wire;
        InterfaceRecord { name, mac, mtu, addresses }
    }
}

impl From<InterfaceRecord> for InterfaceWire {
    fn from(record: InterfaceRecord) -> Self {
        let InterfaceRecord { name, mac, mtu, addresses } = record;
        InterfaceWire { name, mac, mtu, addresses }
    }
}

impl From<RouteWire> for RouteRecord {
    fn from(wire: RouteWire) -> Self {
        let RouteWire { destination, gateway, device, family } = wire;
        RouteRecord { destination, gateway, device, family }
    }
}

impl From<RouteRecord> for RouteWire {
    fn from(record: RouteRecord) -> Self {
        let RouteRecord { destination, gateway, device, family } = record;
        RouteWire { destination, gateway, device, family }
    }
}

impl NetworkRecord {
    pub fn is_empty(&self) -> bool {
        self.interfaces.is_empty()
    }

    /// Checks every field of a record that came from a peer.
    pub fn validate(&self) -> Result<(), NetworkError> {
        let bad = |m: String| Err(NetworkError::Invalid(m));
        if self.interfaces.len() > MAX_INTERFACES || self.routes.len() > MAX_ROUTES {
            return bad(format!("more than {MAX_INTERFACES} interfaces or {MAX_ROUTES} routes"));
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            validate_ifname(&iface.name)?;
            if iface.name == "lo" || self.interfaces[..i].iter().any(|o| o.name == iface.name) {
                return bad(format!("interface `{}` is loopback or listed twice", iface.name));
            }
            let mac = parse_mac(&iface.mac)?;
            if mac[0] & 1 == 1 || mac == [0; 6] {
                return bad(format!("interface `{}` has a multicast or zero MAC {}", iface.name, iface.mac));
            }
            if !(68..=65535).contains(&iface.mtu) {
                return bad(format!("interface `{}` has MTU {}", iface.name, iface.mtu));
            }
            if iface.addresses.len() > 64 {
                return bad(format!("interface `{}` has more than 64 addresses", iface.name));
            }
            for a in &iface.addresses {
                parse_cidr(a)?;
            }
        }
        for r in &self.routes {
            if !self.interfaces.iter().any(|i| i.name == r.device) {
                return bad(format!("route to {} uses unknown interface `{}`", r.destination, r.device));
            }
            let dest_v6 = if r.destination == "default" { r.family == 6 } else { parse_cidr(&r.destination)?.0.is_ipv6() };
            if r.family != 4 && r.family != 6 || dest_v6 != (r.family == 6) {
                return bad(format!("route to {} has family {}", r.destination, r.family));
            }
            if let Some(gw) = &r.gateway {
                let gw: IpAddr = gw.parse().map_err(|_| NetworkError::Invalid(format!("gateway `{gw}` is not an address")))?;
                if gw.is_ipv6() != (r.family == 6) {
                    return bad(format!("route to {} mixes address families", r.destination));
                }
            }
        }
        Ok(())
    }

    /// IPv4 addresses of each interface, for announcing.
    pub fn ipv4_addresses(&self) -> Vec<(String, std::net::Ipv4Addr)> {
        let mut out = Vec::new();
        for iface in &self.interfaces {
            for a in &iface.addresses {
                if let Ok((IpAddr::V4(v4), _)) = parse_cidr(a) {
                    out.push((iface.name.clone(), v4));
                }
            }
        }
        out
    }
}

pub fn validate_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Invalid(format!("`{name}` is not a valid interface name (1-15 of A-Z a-z 0-9 . - _)")))
    }
}

pub fn parse_mac(mac: &str) -> Result<[u8; 6], NetworkError> {
    let bytes: Vec<u8> = mac.split(':').filter_map(|p| (p.len() == 2).then(|| u8::from_str_radix(p, 16).ok()).flatten()).collect();
    <[u8; 6]>::try_from(bytes).map_err(|_| NetworkError::Invalid(format!("`{mac}` is not a MAC address")))
}

/// `addr/prefix` → (addr, prefix), prefix within the family's range.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetworkError> {
    let invalid = || NetworkError::Invalid(format!("`{s}` is not address/prefix"));
    let (a, p) = s.split_once('/').ok_or_else(invalid)?;
    let addr: IpAddr = a.parse().map_err(|_| invalid())?;
    let prefix: u8 = p.parse().map_err(|_| invalid())?;
    if prefix > if addr.is_ipv4() { 32 } else { 128 } {
        return Err(invalid());
    }
    Ok((addr, prefix))
}

/// Reads the interfaces and routes of `netns`. Routes the kernel made
/// itself (for each address's subnet) are left out: they come back with
/// the addresses.
pub fn record(netns: &Netns) -> Result<NetworkRecord, NetworkError> {
    let mut rtnl = Rtnl::open_in(netns)?;
    let links = rtnl.links()?;
    let addresses = rtnl.addresses()?;
    let mut routes = rtnl.routes(4)?;
    routes.extend(rtnl.routes(6)?);
    Ok(record_of(&links, &addresses, &routes))
}

/// The record of a namespace's links, addresses and routes (IPv4 routes
/// before IPv6 ones), as the kernel listed them.
pub fn record_of(links: &[Link], addresses: &[Address], routes: &[Route]) -> NetworkRecord {
    let mut rec = NetworkRecord::default();
    for link in links {
        if link.name.is_empty() || link.name == "lo" || link.loopback {
            continue;
        }
        let addresses = addresses
            .iter()
            .filter(|a| a.index == link.index)
            // Link-local IPv6 addresses are the kernel's, made from the MAC.
            .filter(|a| !(a.local.is_ipv6() && a.link_scope))
            .map(|a| format!("{}/{}", a.local, a.prefix))
            .collect();
        rec.interfaces.push(InterfaceRecord { name: link.name.clone(), mac: link.mac.clone(), mtu: link.mtu.unwrap_or(1500), addresses });
    }
    for r in routes {
        use netlink_packet_route::route::RouteProtocol;
        const MAIN_TABLE: u32 = 254;
        let device = r.oif.and_then(|i| links.iter().find(|l| l.index == i)).map(|l| l.name.as_str()).unwrap_or_default();
        if r.table != MAIN_TABLE || matches!(r.protocol, RouteProtocol::Kernel | RouteProtocol::Ra) || !r.unicast {
            continue;
        }
        if !rec.interfaces.iter().any(|i| i.name == device) {
            continue;
        }
        rec.routes.push(RouteRecord {
            destination: r.destination.map_or_else(|| "default".to_string(), |(a, p)| format!("{a}/{p}")),
            gateway: r.gateway.map(|g| g.to_string()),
            device: device.to_string(),
            family: r.family,
        });
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> NetworkRecord {
        NetworkRecord {
            interfaces: vec![InterfaceRecord {
                name: "eth0".into(),
                mac: "02:42:0a:00:00:05".into(),
                mtu: 1500,
                addresses: vec!["10.0.0.5/24".into(), "fd00::5/64".into()],
            }],
            routes: vec![
                RouteRecord { destination: "default".into(), gateway: Some("10.0.0.1".into()), device: "eth0".into(), family: 4 },
                RouteRecord { destination: "fd01::/64".into(), gateway: Some("fd00::1".into()), device: "eth0".into(), family: 6 },
            ],
        }
    }

    /// The Manifest carries the record as migration-protocol's
    /// `NetworkWire`: converting changes neither the JSON nor the record.
    #[test]
    fn the_wire_format_is_the_records_json() {
        let mut record = good();
        record.routes[1].gateway = None;
        let wire = NetworkWire::from(record.clone());
        assert_eq!(serde_json::to_value(&wire).unwrap(), serde_json::to_value(&record).unwrap());
        assert_eq!(NetworkRecord::from(wire), record);
    }

    #[test]
    fn a_plain_record_is_valid() {
        good().validate().unwrap();
        assert_eq!(good().ipv4_addresses(), vec![("eth0".to_string(), "10.0.0.5".parse().unwrap())]);
    }

    /// What the kernel lists for a container's namespace: loopback, an
    /// interface with IPv4, IPv6 and link-local addresses, the kernel's
    /// subnet routes, routes added by hand, a local-table route and one on
    /// another table.
    #[test]
    fn a_namespace_listing_becomes_the_record() {
        use netlink_packet_route::route::RouteProtocol;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let links = vec![
            Link { index: 1, name: "lo".into(), loopback: true, mac: "00:00:00:00:00:00".into(), mtu: Some(65536), kind: None },
            Link { index: 2, name: "eth0".into(), loopback: false, mac: "02:42:0a:00:00:05".into(), mtu: Some(1500), kind: Some("veth".into()) },
            Link { index: 3, name: "eth1".into(), loopback: false, mac: "02:42:0a:00:00:06".into(), mtu: None, kind: Some("veth".into()) },
        ];
        let addr = |index, a: &str, prefix, link_scope| Address { index, local: ip(a), prefix, link_scope };
        let addresses = vec![
            addr(1, "127.0.0.1", 8, false),
            addr(2, "10.0.0.5", 24, false),
            addr(2, "fd00::5", 64, false),
            addr(2, "fe80::42:aff:fe00:5", 64, true),
        ];
        let route = |family, table, protocol, destination: Option<(&str, u8)>, gateway: Option<&str>, oif| Route {
            family,
            table,
            protocol,
            unicast: true,
            destination: destination.map(|(a, p)| (ip(a), p)),
            gateway: gateway.map(ip),
            oif,
        };
        let mut local = route(4, 255, RouteProtocol::Kernel, Some(("10.0.0.5", 32)), None, Some(2));
        local.unicast = false;
        let routes = vec![
            route(4, 254, RouteProtocol::Boot, None, Some("10.0.0.1"), Some(2)),
            route(4, 254, RouteProtocol::Kernel, Some(("10.0.0.0", 24)), None, Some(2)),
            route(4, 254, RouteProtocol::Static, Some(("10.99.0.7", 32)), Some("10.0.0.1"), Some(2)),
            route(4, 100, RouteProtocol::Boot, Some(("10.98.0.0", 16)), Some("10.0.0.1"), Some(2)),
            route(4, 254, RouteProtocol::Boot, Some(("127.1.0.0", 16)), None, Some(1)),
            route(4, 254, RouteProtocol::Boot, Some(("10.97.0.0", 16)), None, None),
            local,
            route(6, 254, RouteProtocol::Kernel, Some(("fd00::", 64)), None, Some(2)),
            route(6, 254, RouteProtocol::Ra, None, Some("fe80::1"), Some(2)),
            route(6, 254, RouteProtocol::Boot, Some(("fd01::", 64)), Some("fd00::1"), Some(2)),
        ];
        let rec = record_of(&links, &addresses, &routes);
        let mut expected = good();
        expected.interfaces.push(InterfaceRecord { name: "eth1".into(), mac: "02:42:0a:00:00:06".into(), mtu: 1500, addresses: vec![] });
        expected.routes.insert(1, RouteRecord { destination: "10.99.0.7/32".into(), gateway: Some("10.0.0.1".into()), device: "eth0".into(), family: 4 });
        assert_eq!(rec, expected);
    }

    #[test]
    fn hostile_records_are_refused() {
        let cases: Vec<fn(&mut NetworkRecord)> = vec![
            |r| r.interfaces[0].name = "eth0; reboot".into(),
            |r| r.interfaces[0].name = "a-very-long-interface".into(),
            |r| r.interfaces[0].name = "lo".into(),
            |r| r.interfaces[0].name = "-".repeat(0),
            |r| r.interfaces[0].mac = "ff:ff:ff:ff:ff:ff".into(),
            |r| r.interfaces[0].mac = "02:42:0a".into(),
            |r| r.interfaces[0].mtu = 10,
            |r| r.interfaces[0].addresses.push("10.0.0.5/33".into()),
            |r| r.interfaces[0].addresses.push("--help".into()),
            |r| r.routes[0].device = "eth9".into(),
            |r| r.routes[0].gateway = Some("fd00::1".into()),
            |r| r.routes[0].destination = "10.1.0.0".into(),
            |r| r.routes[1].family = 4,
            |r| {
                let i = r.interfaces[0].clone();
                r.interfaces.push(i)
            },
        ];
        for (n, spoil) in cases.into_iter().enumerate() {
            let mut r = good();
            spoil(&mut r);
            assert!(r.validate().is_err(), "case {n} was accepted: {r:?}");
        }
    }
}
