//! Links, addresses and routes read and written over rtnetlink, with
//! netlink-packet-route's typed messages, instead of `ip` processes.
//!
//! A netlink socket belongs to the network namespace of the thread that
//! opened it, for as long as it lives: [`Rtnl::here`] talks to the calling
//! thread's namespace, [`Rtnl::open_in`] to another one, entered by a thread
//! of its own (setns changes only the calling thread) that ends once the
//! socket is open. Requests are synchronous: one at a time, each answered
//! before the next is sent.
//!
//! The message builders and readers are plain functions, so that what is
//! sent and what is made of the answers can be tested without root.

use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::neighbour::{NeighbourMessage, NeighbourState};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::{Netns, NetworkError};

/// A link as far as ctmigrate cares: read from an RTM_NEWLINK message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// The link-layer address, as `ip` shows an Ethernet one
    /// (`aa:bb:cc:dd:ee:ff`); empty for a link without one.
    pub mac: String,
    pub mtu: Option<u32>,
    /// `bridge`, `veth`, ...; `None` for a plain device.
    pub kind: Option<String>,
}

/// An address: read from an RTM_NEWADDR message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    /// The local address (IFA_LOCAL, or IFA_ADDRESS where there is none).
    pub local: IpAddr,
    pub prefix: u8,
    /// Scope link (IPv6 link-local addresses, made by the kernel).
    pub link_scope: bool,
}

/// A route: read from an RTM_NEWROUTE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub family: u8,
    pub table: u32,
    /// `kernel`, `ra`, `boot`, `static`, ...
    pub protocol: RouteProtocol,
    pub unicast: bool,
    /// Destination and prefix; `None` for a default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// Output interface; `None` for a multipath route.
    pub oif: Option<u32>,
}

/// `aa:bb:cc:dd:ee:ff` (lower case), as `ip` shows link-layer addresses.
pub fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Link {
    pub fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            loopback: m.header.link_layer_type == LinkLayerType::Loopback,
            mac: String::new(),
            mtu: None,
            kind: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(bytes) => link.mac = format_mac(bytes),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

impl Address {
    /// `None` for a message without an address.
    pub fn from_message(m: &AddressMessage) -> Option<Self> {
        let mut local = None;
        let mut address = None;
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        Some(Address {
            index: m.header.index,
            local: local.or(address)?,
            prefix: m.header.prefix_len,
            link_scope: m.header.scope == AddressScope::Link,
        })
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Route {
    /// `None` for a family other than IPv4 and IPv6.
    pub fn from_message(m: &RouteMessage) -> Option<Self> {
        let family = match m.header.address_family {
            AddressFamily::Inet => 4,
            AddressFamily::Inet6 => 6,
            _ => return None,
        };
        let mut route = Route {
            family,
            table: u32::from(m.header.table),
            protocol: m.header.protocol,
            unicast: m.header.kind == RouteType::Unicast,
            destination: None,
            gateway: None,
            oif: None,
        };
        let mut dst = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Destination(d) => dst = route_ip(d),
                RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        let len = m.header.destination_prefix_length;
        route.destination = match (dst, family) {
            (Some(d), _) => Some((d, len)),
            // A prefix without an address is all zeros (`ip` shows `0/len`).
            (None, 4) if len > 0 => Some((IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), len)),
            (None, _) if len > 0 => Some((IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), len)),
            (None, _) => None,
        };
        Some(route)
    }
}

/// What `ip link add HOST mtu M master BRIDGE type veth peer name NAME
/// address MAC mtu M netns NETNS` sends: the host end here on the bridge,
/// down; its peer in the namespace open at `peer_netns_fd`.
pub fn veth_request(host_end: &str, bridge_index: u32, peer: &str, peer_mac: [u8; 6], mtu: u32, peer_netns_fd: i32) -> LinkMessage {
    let mut peer_msg = LinkMessage::default();
    peer_msg.attributes = vec![
        LinkAttribute::IfName(peer.to_string()),
        LinkAttribute::Address(peer_mac.to_vec()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::NetNsFd(peer_netns_fd),
    ];
    let mut msg = LinkMessage::default();
    msg.attributes = vec![
        LinkAttribute::IfName(host_end.to_string()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::Controller(bridge_index),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg)))]),
    ];
    msg
}

/// What `ip link set NAME up` sends (the kernel finds the link by name).
pub fn link_up_request(name: &str) -> LinkMessage {
    let mut msg = link_by_name(name);
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

/// A link named `name`: for RTM_GETLINK and RTM_DELLINK by name.
pub fn link_by_name(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg
}

/// What `ip addr add ADDR/PREFIX dev` sends, with `nodad` for IPv6 (the
/// address is moving, not new).
pub fn address_request(index: u32, addr: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.prefix_len = prefix;
    msg.header.index = index;
    // `ip` gives 127/8 host scope, everything else global.
    msg.header.scope = match addr {
        IpAddr::V4(v4) if v4.octets()[0] == 127 => AddressScope::Host,
        _ => AddressScope::Universe,
    };
    msg.attributes = vec![AddressAttribute::Local(addr), AddressAttribute::Address(addr)];
    if addr.is_ipv6() {
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg
}

/// What `ip route add DEST [via GW] dev DEV onlink` sends (table main,
/// protocol boot). `destination` `None` is the default route. Onlink goes
/// with a gateway only: the kernel refuses it on a route without one.
pub fn route_request(family: u8, destination: Option<(IpAddr, u8)>, gateway: Option<IpAddr>, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if family == 6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    // As `ip` chooses: a route through a gateway is global, one without is
    // on the link.
    msg.header.scope = if gateway.is_some() { RouteScope::Universe } else { RouteScope::Link };
    if let Some((addr, prefix)) = destination {
        msg.header.destination_prefix_length = prefix;
        msg.attributes.push(RouteAttribute::Destination(addr.into()));
    }
    if let Some(gw) = gateway {
        msg.header.flags = RouteFlags::Onlink;
        msg.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

/// The kernel's own words on a refused request (the extended ACK's
/// NLMSGERR_ATTR_MSG), from the payload of an NLMSG_ERROR after the
/// request's header (the socket asks for capped ACKs).
fn extack_message(after_code: &[u8]) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    const NLMSGHDR_LEN: usize = 16;
    let tlvs = after_code.get(NLMSGHDR_LEN..)?;
    NlasIterator::new(tlvs).flatten().find(|nla| nla.kind() == NLMSGERR_ATTR_MSG).map(|nla| {
        let value = nla.value();
        String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
    })
}

/// A refused request's error: errno, and the kernel's message when it gave
/// one.
fn refused(what: String, errno: i32, detail: Option<String>) -> NetworkError {
    NetworkError::Netlink { what, errno: nix::errno::Errno::from_raw(errno.abs()), detail: detail.filter(|d| !d.is_empty()) }
}

/// A route netlink socket in one namespace.
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
    /// Where the socket talks, for messages: ` in /run/netns/x`, or empty
    /// for the caller's namespace.
    place: String,
}

impl Rtnl {
    /// A socket in the calling thread's namespace.
    pub fn here() -> Result<Self, NetworkError> {
        Self::open(String::new())
    }

    /// A socket in `netns`, opened by a thread that enters it.
    pub fn open_in(netns: &Netns) -> Result<Self, NetworkError> {
        let path = netns.path();
        std::thread::spawn(move || {
            crate::netns::enter(&path)?;
            Self::open(format!(" in {}", path.display()))
        })
        .join()
        .unwrap_or_else(|_| Err(NetworkError::Invalid("the thread opening a netlink socket panicked".into())))
    }

    fn open(place: String) -> Result<Self, NetworkError> {
        let io = |context: &str| {
            let context = format!("{context}{place}");
            move |source| NetworkError::Io { context, source }
        };
        let socket = Socket::new(NETLINK_ROUTE).map_err(io("opening a route netlink socket"))?;
        // Errors carry the kernel's message and not the whole request.
        socket.set_ext_ack(true).map_err(io("asking for extended netlink errors"))?;
        socket.set_cap_ack(true).map_err(io("asking for capped netlink errors"))?;
        Ok(Rtnl { socket, sequence: 0, place })
    }

    /// Sends `message` and gathers the answers: every message of a dump,
    /// or the reply and the ACK of a request.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16, what: &dyn Fn() -> String) -> Result<Vec<RouteNetlinkMessage>, NetworkError> {
        let what = || format!("{}{}", what(), self.place);
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send_to(&buf, &SocketAddr::new(0, 0), 0).map_err(|source| NetworkError::Io { context: what(), source })?;
        let mut answers = Vec::new();
        loop {
            let (bytes, _) = self.socket.recv_from_full().map_err(|source| NetworkError::Io { context: what(), source })?;
            let mut offset = 0;
            while offset < bytes.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[offset..])
                    .map_err(|e| refused(what(), libc::EBADMSG, Some(format!("undecodable answer: {e}"))))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += (length + 3) & !3;
                if reply.header.sequence_number != self.sequence {
                    continue; // an answer to an earlier request
                }
                match reply.payload {
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(answers),
                        Some(code) => return Err(refused(what(), code.get(), extack_message(&e.header))),
                    },
                    NetlinkPayload::Done(d) if d.code != 0 => return Err(refused(what(), d.code, None)),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Overrun(_) => return Err(refused(what(), libc::ENOBUFS, Some("answer overrun".into()))),
                    _ => {} // NLMSG_NOOP, and kinds added later
                }
            }
        }
    }

    /// A request that changes something: the kernel's ACK is awaited.
    fn change(&mut self, message: RouteNetlinkMessage, flags: u16, what: &dyn Fn() -> String) -> Result<(), NetworkError> {
        self.request(message, flags | NLM_F_ACK, what).map(|_| ())
    }

    pub fn links(&mut self) -> Result<Vec<Link>, NetworkError> {
        let answers = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP, &|| "reading the links".into())?;
        Ok(answers.iter().filter_map(|m| if let RouteNetlinkMessage::NewLink(l) = m { Some(Link::from_message(l)) } else { None }).collect())
    }

    /// Link `name`, or `None` if there is none.
    pub fn link(&mut self, name: &str) -> Result<Option<Link>, NetworkError> {
        match self.request(RouteNetlinkMessage::GetLink(link_by_name(name)), NLM_F_ACK, &|| format!("finding link {name}")) {
            Ok(answers) => Ok(answers.iter().find_map(|m| if let RouteNetlinkMessage::NewLink(l) = m { Some(Link::from_message(l)) } else { None })),
            Err(NetworkError::Netlink { errno: nix::errno::Errno::ENODEV, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The index of link `name`; its absence is an error.
    pub fn index(&mut self, name: &str) -> Result<u32, NetworkError> {
        self.link(name)?.map(|l| l.index).ok_or_else(|| refused(format!("finding link {name}{}", self.place), libc::ENODEV, None))
    }

    pub fn addresses(&mut self) -> Result<Vec<Address>, NetworkError> {
        let answers = self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP, &|| "reading the addresses".into())?;
        Ok(answers.iter().filter_map(|m| if let RouteNetlinkMessage::NewAddress(a) = m { Address::from_message(a) } else { None }).collect())
    }

    /// The routes of family 4 or 6, every table.
    pub fn routes(&mut self, family: u8) -> Result<Vec<Route>, NetworkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if family == 6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let answers = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_DUMP, &|| format!("reading the IPv{family} routes"))?;
        Ok(answers.iter().filter_map(|m| if let RouteNetlinkMessage::NewRoute(r) = m { Route::from_message(r) } else { None }).collect())
    }

    /// Creates a veth pair: `host_end` here on the bridge `bridge_index`,
    /// down; `peer` (with `peer_mac`) in the namespace at `peer_netns`.
    pub fn add_veth(&mut self, host_end: &str, bridge_index: u32, peer: &str, peer_mac: [u8; 6], mtu: u32, peer_netns: &Path) -> Result<(), NetworkError> {
        use std::os::fd::AsRawFd;
        let what = || format!("adding veth {host_end} (peer {peer} in {})", peer_netns.display());
        let ns = std::fs::File::open(peer_netns).map_err(|source| NetworkError::Io { context: what(), source })?;
        let msg = veth_request(host_end, bridge_index, peer, peer_mac, mtu, ns.as_raw_fd());
        // `ns` stays open until the kernel has answered.
        let result = self.change(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL, &what);
        drop(ns);
        result
    }

    pub fn set_up(&mut self, name: &str) -> Result<(), NetworkError> {
        self.change(RouteNetlinkMessage::SetLink(link_up_request(name)), 0, &|| format!("bringing up {name}"))
    }

    pub fn delete_link(&mut self, name: &str) -> Result<(), NetworkError> {
        self.change(RouteNetlinkMessage::DelLink(link_by_name(name)), 0, &|| format!("deleting link {name}"))
    }

    /// Forgets what this namespace learnt or was still learning of its
    /// neighbours (IPv4 and IPv6; permanent and no-ARP entries stay); how
    /// many entries went.
    pub fn flush_neighbours(&mut self) -> Result<usize, NetworkError> {
        let answers = self.request(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), NLM_F_DUMP, &|| "reading the neighbours".into())?;
        let mut flushed = 0;
        for answer in answers {
            let RouteNetlinkMessage::NewNeighbour(entry) = answer else { continue };
            if matches!(entry.header.state, NeighbourState::Permanent | NeighbourState::Noarp) {
                continue;
            }
            match self.change(RouteNetlinkMessage::DelNeighbour(entry), 0, &|| "forgetting a neighbour".into()) {
                Ok(()) => flushed += 1,
                // Gone meanwhile (expired, or resolved and replaced).
                Err(NetworkError::Netlink { errno: nix::errno::Errno::ENOENT, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(flushed)
    }

    pub fn add_address(&mut self, index: u32, name: &str, addr: IpAddr, prefix: u8) -> Result<(), NetworkError> {
        let msg = address_request(index, addr, prefix);
        self.change(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL, &|| format!("adding address {addr}/{prefix} to {name}"))
    }

    pub fn add_route(&mut self, family: u8, destination: Option<(IpAddr, u8)>, gateway: Option<IpAddr>, oif: u32, shown: &str) -> Result<(), NetworkError> {
        let msg = route_request(family, destination, gateway, oif);
        self.change(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_EXCL, &|| format!("adding route {shown}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};

    /// Emits `msg` as the kernel's bytes and parses them back.
    fn round_trip_link(msg: &LinkMessage) -> LinkMessage {
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        LinkMessage::parse(buf.as_slice()).unwrap()
    }

    #[test]
    fn a_link_message_becomes_a_link() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.link_layer_type = LinkLayerType::Ether;
        msg.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![0x02, 0x42, 0x0a, 0, 0, 0x05]),
            LinkAttribute::Mtu(1400),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]),
        ];
        let link = Link::from_message(&round_trip_link(&msg));
        assert_eq!(
            link,
            Link { index: 7, name: "eth0".into(), loopback: false, mac: "02:42:0a:00:00:05".into(), mtu: Some(1400), kind: Some("bridge".into()) }
        );
        let mut lo = LinkMessage::default();
        lo.header.link_layer_type = LinkLayerType::Loopback;
        assert!(Link::from_message(&lo).loopback);
    }

    #[test]
    fn a_veth_request_carries_the_peer_and_the_bridge() {
        let msg = round_trip_link(&veth_request("ctm1", 3, "eth0", [2, 0, 0, 0, 0, 9], 1400, 42));
        assert!(msg.attributes.contains(&LinkAttribute::IfName("ctm1".into())));
        assert!(msg.attributes.contains(&LinkAttribute::Controller(3)));
        assert!(msg.attributes.contains(&LinkAttribute::Mtu(1400)));
        let peer = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) => Some(p.clone()),
                    _ => None,
                }),
                _ => None,
            })
            .expect("no veth peer");
        assert_eq!(Link::from_message(&peer).mac, "02:00:00:00:00:09");
        assert!(peer.attributes.contains(&LinkAttribute::NetNsFd(42)));
        assert!(peer.attributes.contains(&LinkAttribute::IfName("eth0".into())));
    }

    #[test]
    fn address_requests_and_answers() {
        let v4 = address_request(4, "10.0.0.5".parse().unwrap(), 24);
        assert_eq!((v4.header.family, v4.header.scope, v4.header.flags), (AddressFamily::Inet, AddressScope::Universe, AddressHeaderFlags::empty()));
        assert_eq!(Address::from_message(&v4), Some(Address { index: 4, local: "10.0.0.5".parse().unwrap(), prefix: 24, link_scope: false }));
        let v6 = address_request(4, "fd00::5".parse().unwrap(), 64);
        assert!(v6.header.flags.contains(AddressHeaderFlags::Nodad));
        assert!(v6.attributes.contains(&AddressAttribute::Flags(AddressFlags::Nodad)));
        assert_eq!(address_request(1, "127.0.0.2".parse().unwrap(), 8).header.scope, AddressScope::Host);
        // An IPv6 answer has IFA_ADDRESS only; a link-local one is marked.
        let mut answer = AddressMessage::default();
        answer.header.family = AddressFamily::Inet6;
        answer.header.prefix_len = 64;
        answer.header.scope = AddressScope::Link;
        answer.attributes = vec![AddressAttribute::Address("fe80::1".parse().unwrap())];
        assert_eq!(Address::from_message(&answer).map(|a| (a.local, a.link_scope)), Some(("fe80::1".parse().unwrap(), true)));
        assert_eq!(Address::from_message(&AddressMessage::default()), None);
    }

    #[test]
    fn route_requests_read_back_as_the_route() {
        let gw: IpAddr = "10.0.0.1".parse().unwrap();
        let default = route_request(4, None, Some(gw), 2);
        assert_eq!((default.header.scope, default.header.flags, default.header.table), (RouteScope::Universe, RouteFlags::Onlink, RouteHeader::RT_TABLE_MAIN));
        assert_eq!(
            Route::from_message(&default),
            Some(Route { family: 4, table: 254, protocol: RouteProtocol::Boot, unicast: true, destination: None, gateway: Some(gw), oif: Some(2) })
        );
        let net = route_request(6, Some(("fd01::".parse().unwrap(), 64)), None, 3);
        assert_eq!((net.header.scope, net.header.flags), (RouteScope::Link, RouteFlags::empty()));
        let read = Route::from_message(&net).unwrap();
        assert_eq!((read.family, read.destination, read.gateway), (6, Some(("fd01::".parse().unwrap(), 64)), None));
    }

    #[test]
    fn the_kernels_message_is_read_from_a_capped_error() {
        let mut payload = vec![0u8; 16]; // the request's header
        let text = b"Invalid flags for nexthop\0";
        let len = 4 + text.len();
        payload.extend_from_slice(&(len as u16).to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        payload.resize(payload.len().next_multiple_of(4), 0);
        assert_eq!(extack_message(&payload).as_deref(), Some("Invalid flags for nexthop"));
        assert_eq!(extack_message(&[0u8; 16]), None);
    }

    #[test]
    fn macs_are_shown_as_ip_shows_them() {
        assert_eq!(format_mac(&[0x02, 0xab, 0, 1, 2, 0xff]), "02:ab:00:01:02:ff");
        assert_eq!(format_mac(&[]), "");
    }
}
