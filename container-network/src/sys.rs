//! The raw socket calls this crate needs; nix has no packet-socket address
//! type that can be built by hand, and no IPPROTO_RAW socket.

use std::io;

/// A datagram packet socket for sending ARP payloads (the kernel adds the
/// Ethernet header). Made with protocol 0, it receives nothing: no packet
/// hook is registered for it.
pub(crate) struct ArpSocket {
    fd: std::os::fd::OwnedFd,
}

impl ArpSocket {
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked and
        // owned immediately below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(ArpSocket { fd })
    }

    /// Broadcasts one ARP payload on interface `ifindex`.
    pub(crate) fn broadcast(&self, ifindex: u32, payload: &[u8]) -> io::Result<()> {
        const ETH_P_ARP: u16 = 0x0806;
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: `payload` and `addr` are valid for the lengths given, and
        // `self.fd` is open for the duration of the call.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A raw IPv4 socket that sends whole packets (IPPROTO_RAW: the caller
/// writes the IP header; the kernel fills in only what is left zero). It
/// receives nothing.
pub(crate) struct RawIpSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawIpSocket {
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked and
        // owned immediately below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(RawIpSocket { fd })
    }

    /// Sends one IPv4 packet (header included) towards `dst`.
    pub(crate) fn send_to(&self, packet: &[u8], dst: std::net::Ipv4Addr) -> io::Result<()> {
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        // SAFETY: `packet` and `addr` are valid for the lengths given, and
        // `self.fd` is open for the duration of the call.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
