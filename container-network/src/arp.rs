//! Gratuitous ARP: tells the segment that an IPv4 address now lives at a
//! MAC behind a new port, so bridges and neighbours update at once instead
//! of when their entries expire.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::NetworkError;

/// An ARP packet (RFC 826) for Ethernet and IPv4.
pub fn arp_packet(op: u16, mac: [u8; 6], addr: Ipv4Addr, target_mac: [u8; 6]) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&addr.octets());
    p[18..24].copy_from_slice(&target_mac);
    p[24..28].copy_from_slice(&addr.octets());
    p
}

/// Broadcasts, from interface `ifname` inside the namespace at `netns`, a
/// gratuitous ARP request and reply for each address.
pub fn announce(netns: &Path, ifname: &str, mac: [u8; 6], addrs: &[Ipv4Addr]) -> Result<(), NetworkError> {
    announce_many(netns, vec![(ifname.to_string(), mac, addrs.to_vec())])
}

/// [`announce`] for several interfaces (name, MAC, addresses) of one
/// namespace at once, through one socket.
pub fn announce_many(netns: &Path, interfaces: Vec<(String, [u8; 6], Vec<Ipv4Addr>)>) -> Result<(), NetworkError> {
    let netns = netns.to_path_buf();
    // setns changes only the calling thread's namespace: do it in a thread
    // of its own, which then ends.
    std::thread::spawn(move || -> Result<(), NetworkError> {
        let io = |context: String| move |source| NetworkError::Io { context, source };
        crate::netns::enter(&netns)?;
        let socket = crate::sys::ArpSocket::open().map_err(io(format!("opening a packet socket in {}", netns.display())))?;
        let sent = (|| {
            for (ifname, mac, addrs) in &interfaces {
                let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).map_err(|e| io(format!("finding {ifname}"))(e.into()))?;
                for addr in addrs {
                    for (op, target) in [(1u16, [0u8; 6]), (2u16, [0xff; 6])] {
                        socket
                            .broadcast(ifindex, &arp_packet(op, *mac, *addr, target))
                            .map_err(io(format!("sending gratuitous ARP for {addr} on {ifname}")))?;
                    }
                }
            }
            Ok(())
        })();
        // Closing a packet socket waits for an RCU grace period (tens of
        // milliseconds on a busy host), within the migration's frozen
        // window: it is closed by a thread that nobody waits for.
        std::thread::spawn(move || drop(socket));
        sent
    })
    .join()
    .unwrap_or_else(|_| Err(NetworkError::Invalid("the ARP thread panicked".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let p = arp_packet(1, [2, 0, 0, 0, 0, 9], Ipv4Addr::new(10, 0, 0, 9), [0; 6]);
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &[2, 0, 0, 0, 0, 9]);
        assert_eq!(&p[14..18], &[10, 0, 0, 9]);
        assert_eq!(&p[24..28], &[10, 0, 0, 9]);
    }
}
