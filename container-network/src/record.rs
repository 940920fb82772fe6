//! What the sender records of a container's network, and how the receiver
//! checks it (it comes from the peer: every field is validated before any
//! of it reaches `ip`).

use std::net::IpAddr;

use migration_protocol::{InterfaceWire, NetworkWire, RouteWire};
use serde::{Deserialize, Serialize};

use crate::{ip_json, Netns, NetworkError};

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
    let mut rec = NetworkRecord::default();
    for link in ip_json(Some(netns), &["addr", "show"])? {
        let name = link["ifname"].as_str().unwrap_or_default().to_string();
        if name.is_empty() || name == "lo" || link["link_type"].as_str() == Some("loopback") {
            continue;
        }
        let mut addresses = Vec::new();
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let (Some(local), Some(prefix)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else { continue };
            // Link-local IPv6 addresses are the kernel's, made from the MAC.
            if a["family"].as_str() == Some("inet6") && a["scope"].as_str() == Some("link") {
                continue;
            }
            addresses.push(format!("{local}/{prefix}"));
        }
        rec.interfaces.push(InterfaceRecord {
            mac: link["address"].as_str().unwrap_or_default().to_string(),
            mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
            name,
            addresses,
        });
    }
    for (family, flag) in [(4u8, "-4"), (6u8, "-6")] {
        for r in ip_json(Some(netns), &[flag, "route", "show", "table", "main"])? {
            let proto = r["protocol"].as_str().unwrap_or("boot");
            let device = r["dev"].as_str().unwrap_or_default();
            if matches!(proto, "kernel" | "ra") || !rec.interfaces.iter().any(|i| i.name == device) {
                continue;
            }
            if r["type"].as_str().is_some_and(|t| t != "unicast") {
                continue;
            }
            let mut destination = r["dst"].as_str().unwrap_or("default").to_string();
            if destination != "default" && !destination.contains('/') {
                destination.push_str(if family == 4 { "/32" } else { "/128" });
            }
            rec.routes.push(RouteRecord {
                destination,
                gateway: r["gateway"].as_str().map(str::to_string),
                device: device.to_string(),
                family,
            });
        }
    }
    Ok(rec)
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
