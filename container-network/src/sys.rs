//! The raw socket calls this crate needs; nix has no packet-socket address
//! type that can be built by hand.

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
