//! Nudging the peers of moved TCP connections to retransmit now.
//!
//! # Why
//!
//! While a container is dumped its network is locked (see [`crate::lock`]):
//! what a peer sends in that window is dropped, so the peer's TCP times out
//! and retransmits with exponential backoff (200, 400, 800, 1600 ms, ...).
//! Once the restored copy runs, the peer notices only at its next backed-off
//! timeout: a 191 ms freeze cost a client 3.3 s. This module makes each peer
//! retransmit as soon as the copy runs.
//!
//! # What works, measured (kernel 6.18, two namespaces, SACK and timestamps on)
//!
//! A client sending every 20 ms, its server's traffic dropped for 1.9 s (the
//! client retransmitted at 0.2, 0.4, 0.85 and 1.7 s and was waiting for 3.4 s),
//! then the drop lifted and one nudge sent from the server's namespace:
//!
//! | nudge | client's first retransmission after the lift |
//! |---|---|
//! | none | 1428 ms (its next backed-off timeout) |
//! | 3 duplicate ACKs (ack = server's rcv_nxt, seq = snd_nxt), with or without the timestamp option | 1412 to 1432 ms: no effect |
//! | ICMP host unreachable quoting the client's segment at its snd_una | 0 ms |
//!
//! Duplicate ACKs cannot help: after a timeout the sender is in `TCP_CA_Loss`
//! with a congestion window of 1, which its lost retransmission still fills,
//! so nothing is sent until the next timeout. An ICMP host unreachable
//! (or net unreachable) whose quoted TCP header has `seq == snd_una`, received
//! while the connection has backed off, makes Linux undo one backoff step
//! (RFC 6069, `tcp_ld_RTO_revert`) and retransmit at once if the reverted
//! timeout has already passed since the last retransmission; otherwise the
//! timer is re-armed to the reverted timeout. So we send [`ICMP_PER_CONNECTION`]
//! of them: the peer ends with no backoff left, having retransmitted at once
//! (or within its un-backed-off RTO, when it last retransmitted less than one
//! base RTO ago). Extra ones are no-ops (the revert needs a backoff left),
//! and a peer that had not timed out ignores them (soft error, dropped).
//!
//! Then one ACK (ack = rcv_nxt, seq = snd_nxt, the window and timestamp the
//! restored socket has): if the lock dropped the server's last ACK, the peer's
//! snd_una is behind rcv_nxt and the ICMPs quoted the wrong sequence number;
//! the ACK moves it on, which frees the congestion window (and so
//! retransmits at once) when it acknowledges the whole retransmitted segment.
//! When it only acknowledges part of it, the peer waits for its own timeout
//! as before (measured: 1.3 s either way); the ACK never makes things worse.
//! It goes after the ICMPs: an ACK that moves snd_una clears the peer's
//! retransmission count, and with it the RFC 6069 revert.
//!
//! A peer whose socket has `IP_RECVERR` set sees the ICMP as an error on its
//! next call (`EHOSTUNREACH`), as it would any router's; without it (the
//! default) the error is soft and forgotten once the peer hears from us.
//!
//! # Where the numbers come from
//!
//! CRIU's images, which the destination holds at restore time: each
//! established TCP socket's addresses and ports are in `files.img` (an
//! `inet_sk_entry` in a `file_entry`), its sequence numbers, window and
//! timestamp in `tcp-stream-<ino>.img`. They are what the restored socket was
//! given, so no live socket of the container is touched (no `pidfd_getfd`,
//! no repair mode on a running socket). What the restored socket sent since
//! can only make our packets stale, and stale ones are harmless: an old ACK
//! is ignored, an old timestamp fails the peer's PAWS check, a wrong quoted
//! sequence number is ignored. The timestamp value is the dump's, never more
//! than the restored socket's clock (a larger one would make the peer drop
//! the real socket's segments until its clock caught up).
//!
//! Packets are sent through a raw IPv4 socket opened inside the container's
//! network namespace, with the container's address as source: they leave as
//! the restored socket's own would. IPv4 connections are nudged, also those
//! of dual-stack sockets (IPv4-mapped addresses); IPv6 ones are not.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

/// ICMP messages sent per connection: one backoff step is undone per
/// message, and Linux backs off at most `tcp_retries2` (15) times.
pub const ICMP_PER_CONNECTION: usize = 16;

/// Most connections read from one dump.
pub const MAX_CONNECTIONS: usize = 65_536;

/// Largest image entry read (an `inet_sk_entry` or `tcp_stream_entry` is
/// a few hundred bytes).
const MAX_ENTRY: usize = 1 << 20;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const FILES_MAGIC: u32 = 0x5630_3138;
const TCP_STREAM_MAGIC: u32 = 0x5146_5506;

/// Why nudging failed. A failure never fails a migration: the receiver
/// warns and the peers recover at their own timeouts.
#[derive(Debug, thiserror::Error)]
pub enum NudgeError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Image { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Network(#[from] crate::NetworkError),
}

/// One established IPv4 TCP connection of the dump, as the restored
/// socket has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnection {
    /// The container's end.
    pub local: SocketAddrV4,
    /// The peer to nudge.
    pub remote: SocketAddrV4,
    /// Next sequence number expected from the peer (the peer's snd_una,
    /// unless the lock dropped our last ACK).
    pub rcv_nxt: u32,
    /// Next sequence number the container's socket sends.
    pub snd_nxt: u32,
    /// Window to advertise, already scaled down by our receive scale.
    pub window: Option<u16>,
    /// The connection's TCP timestamp clock at the dump, when timestamps
    /// were negotiated.
    pub tsval: Option<u32>,
}

/// The established IPv4 TCP connections in CRIU's images in `dir` (also
/// those of IPv6 sockets with IPv4-mapped addresses). A
/// dump without `files.img` (no files at all) has none.
pub fn connections_from_images(dir: &Path) -> Result<Vec<TcpConnection>, NudgeError> {
    let files = dir.join("files.img");
    if !files.exists() {
        return Ok(Vec::new());
    }
    let data = read(&files)?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in entries(&files, &data, FILES_MAGIC)? {
        let Some(sk) = inet_socket(entry).map_err(|reason| NudgeError::Image { path: files.clone(), reason })? else { continue };
        if !seen.insert(sk.ino) {
            continue;
        }
        let stream_path = dir.join(format!("tcp-stream-{:x}.img", sk.ino));
        let stream = read(&stream_path)?;
        let first = entries(&stream_path, &stream, TCP_STREAM_MAGIC)?
            .next()
            .ok_or_else(|| NudgeError::Image { path: stream_path.clone(), reason: "no entry".into() })?;
        let st = tcp_stream(first).map_err(|reason| NudgeError::Image { path: stream_path.clone(), reason })?;
        out.push(sk.connection(&st));
        if out.len() > MAX_CONNECTIONS {
            return Err(NudgeError::Image { path: files, reason: format!("more than {MAX_CONNECTIONS} TCP connections") });
        }
    }
    Ok(out)
}

fn read(path: &Path) -> Result<Vec<u8>, NudgeError> {
    std::fs::read(path).map_err(|source| NudgeError::Read { path: path.to_path_buf(), source })
}

/// The protobuf entries of a CRIU image: two magic words (the common one,
/// then the image's), then entries of a little-endian u32 size and that
/// many bytes. (An image may carry raw data after an entry, as
/// `tcp-stream` does after its one entry: the iterator then yields junk
/// or stops, so callers take what they expect and no more.)
fn entries<'d>(path: &Path, data: &'d [u8], magic: u32) -> Result<impl Iterator<Item = &'d [u8]> + 'd, NudgeError> {
    let word = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    if word(0) != Some(IMG_COMMON_MAGIC) || word(4) != Some(magic) {
        return Err(NudgeError::Image { path: path.to_path_buf(), reason: format!("not a CRIU image with magic {magic:#x}") });
    }
    let mut at = 8;
    Ok(std::iter::from_fn(move || {
        let size = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        if size > MAX_ENTRY {
            return None;
        }
        let entry = data.get(at + 4..at + 4 + size)?;
        at += 4 + size;
        Some(entry)
    }))
}

/// One protobuf field: number and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field<'d> {
    Varint(u32, u64),
    Bytes(u32, &'d [u8]),
    Fixed(u32),
}

/// The fields of a protobuf message, in order.
fn fields(mut data: &[u8]) -> impl Iterator<Item = Result<Field<'_>, String>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let mut next = || -> Result<Field<'_>, String> {
            let key = varint(&mut data)?;
            let number = u32::try_from(key >> 3).map_err(|_| "field number out of range".to_string())?;
            match key & 7 {
                0 => Ok(Field::Varint(number, varint(&mut data)?)),
                1 | 5 => {
                    let n = if key & 7 == 1 { 8 } else { 4 };
                    data = data.get(n..).ok_or("truncated fixed field")?;
                    Ok(Field::Fixed(number))
                }
                2 => {
                    let len = usize::try_from(varint(&mut data)?).map_err(|_| "length out of range")?;
                    let bytes = data.get(..len).ok_or("truncated length-delimited field")?;
                    data = &data[len..];
                    Ok(Field::Bytes(number, bytes))
                }
                t => Err(format!("unsupported wire type {t}")),
            }
        };
        let field = next();
        if field.is_err() {
            data = &[];
        }
        Some(field)
    })
}

fn varint(data: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first().ok_or("truncated varint")?;
        *data = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

/// Of an `inet_sk_entry`, what a nudge needs.
#[derive(Debug, Default)]
struct InetSocket {
    ino: u32,
    src: Vec<u32>,
    dst: Vec<u32>,
    src_port: u16,
    dst_port: u16,
}

impl InetSocket {
    fn connection(&self, st: &TcpStream) -> TcpConnection {
        // CRIU keeps an IPv4 address as the in_addr's four bytes read as a
        // host-order u32.
        let addr = |words: &[u32]| Ipv4Addr::from(words[0].to_ne_bytes());
        let tcpi_opt_timestamps = 1;
        TcpConnection {
            local: SocketAddrV4::new(addr(&self.src), self.src_port),
            remote: SocketAddrV4::new(addr(&self.dst), self.dst_port),
            rcv_nxt: st.inq_seq,
            snd_nxt: st.outq_seq.wrapping_sub(st.unsq_len),
            window: st.rcv_wnd.map(|w| u16::try_from(w >> st.rcv_wscale.min(14)).unwrap_or(u16::MAX)),
            tsval: if st.opt_mask & tcpi_opt_timestamps != 0 { st.timestamp } else { None },
        }
    }
}

/// A `file_entry` of `files.img`: Some for an established IPv4 TCP
/// socket, None for any other file.
fn inet_socket(entry: &[u8]) -> Result<Option<InetSocket>, String> {
    const FD_TYPE_INETSK: u64 = 4;
    let (mut kind, mut isk) = (None, None);
    for f in fields(entry) {
        match f? {
            Field::Varint(1, t) => kind = Some(t),
            Field::Bytes(4, b) => isk = Some(b),
            _ => {}
        }
    }
    let (Some(FD_TYPE_INETSK), Some(isk)) = (kind, isk) else { return Ok(None) };
    let (mut family, mut sk_type, mut proto, mut state) = (0, 0, 0, 0);
    let mut sk = InetSocket::default();
    let words = |b: &[u8], into: &mut Vec<u32>| -> Result<(), String> {
        let mut b = b;
        while !b.is_empty() {
            into.push(varint(&mut b)? as u32);
        }
        Ok(())
    };
    for f in fields(isk) {
        match f? {
            Field::Varint(2, v) => sk.ino = v as u32,
            Field::Varint(3, v) => family = v,
            Field::Varint(4, v) => sk_type = v,
            Field::Varint(5, v) => proto = v,
            Field::Varint(6, v) => state = v,
            Field::Varint(7, v) => sk.src_port = v as u16,
            Field::Varint(8, v) => sk.dst_port = v as u16,
            Field::Varint(11, v) => sk.src.push(v as u32),
            Field::Varint(12, v) => sk.dst.push(v as u32),
            // Packed repeated fields.
            Field::Bytes(11, b) => words(b, &mut sk.src)?,
            Field::Bytes(12, b) => words(b, &mut sk.dst)?,
            _ => {}
        }
    }
    const AF_INET: u64 = libc::AF_INET as u64;
    const AF_INET6: u64 = libc::AF_INET6 as u64;
    const SOCK_STREAM: u64 = libc::SOCK_STREAM as u64;
    const IPPROTO_TCP: u64 = libc::IPPROTO_TCP as u64;
    const TCP_ESTABLISHED: u64 = 1;
    if (sk_type, proto, state) != (SOCK_STREAM, IPPROTO_TCP, TCP_ESTABLISHED) {
        return Ok(None);
    }
    match family {
        AF_INET if sk.src.len() == 1 && sk.dst.len() == 1 => Ok(Some(sk)),
        // A dual-stack socket's IPv4 connection: both ends ::ffff:a.b.c.d
        // (a server listening on `::` accepts IPv4 clients so).
        AF_INET6 if v4_mapped(&sk.src) && v4_mapped(&sk.dst) => {
            sk.src.drain(..3);
            sk.dst.drain(..3);
            Ok(Some(sk))
        }
        _ => Ok(None),
    }
}

/// Whether an IPv6 address, as CRIU's four host-order words of its bytes,
/// is IPv4-mapped (`::ffff:0:0/96`).
fn v4_mapped(words: &[u32]) -> bool {
    words.len() == 4 && words[0] == 0 && words[1] == 0 && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Of a `tcp_stream_entry`, what a nudge needs.
#[derive(Debug, Default)]
struct TcpStream {
    inq_seq: u32,
    outq_seq: u32,
    opt_mask: u32,
    rcv_wscale: u32,
    timestamp: Option<u32>,
    unsq_len: u32,
    rcv_wnd: Option<u32>,
}

fn tcp_stream(entry: &[u8]) -> Result<TcpStream, String> {
    let mut st = TcpStream::default();
    let (mut inq, mut outq) = (false, false);
    for f in fields(entry) {
        match f? {
            Field::Varint(2, v) => (st.inq_seq, inq) = (v as u32, true),
            Field::Varint(4, v) => (st.outq_seq, outq) = (v as u32, true),
            Field::Varint(5, v) => st.opt_mask = v as u32,
            Field::Varint(8, v) => st.rcv_wscale = v as u32,
            Field::Varint(9, v) => st.timestamp = Some(v as u32),
            Field::Varint(12, v) => st.unsq_len = v as u32,
            Field::Varint(16, v) => st.rcv_wnd = Some(v as u32),
            _ => {}
        }
    }
    if !inq || !outq {
        return Err("a tcp_stream_entry without its sequence numbers".into());
    }
    Ok(st)
}

/// The Internet checksum (RFC 1071) of `parts`, taken as one byte string.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for b in parts.iter().flat_map(|p| p.iter().copied()) {
        match odd.take() {
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
            None => odd = Some(b),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (20 bytes, DF, TTL 64) for `payload_len` bytes of `protocol`.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

/// The ICMP host unreachable (type 3, code 1) that `conn`'s peer would get
/// from a router that could not deliver the peer's segment at `rcv_nxt`:
/// a whole IPv4 packet, from the container's address to the peer. It
/// quotes the segment's IPv4 header and the first 8 bytes of its TCP
/// header (ports and sequence number), as RFC 792 asks.
pub fn icmp_host_unreachable(conn: &TcpConnection) -> Vec<u8> {
    let (peer, us) = (*conn.remote.ip(), *conn.local.ip());
    let mut quoted = Vec::with_capacity(28);
    quoted.extend_from_slice(&ipv4_header(peer, us, libc::IPPROTO_TCP as u8, 20));
    quoted.extend_from_slice(&conn.remote.port().to_be_bytes());
    quoted.extend_from_slice(&conn.local.port().to_be_bytes());
    quoted.extend_from_slice(&conn.rcv_nxt.to_be_bytes());
    let mut icmp = vec![3u8, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut packet = ipv4_header(us, peer, libc::IPPROTO_ICMP as u8, icmp.len()).to_vec();
    packet.extend_from_slice(&icmp);
    packet
}

/// A pure ACK from the container's socket to the peer (ack = rcv_nxt, seq =
/// snd_nxt, the restored window, the timestamp option with the dump's
/// clock and no echo), as a whole IPv4 packet; None when the images did
/// not say which window to advertise.
pub fn ack_segment(conn: &TcpConnection) -> Option<Vec<u8>> {
    let window = conn.window?;
    let (us, peer) = (*conn.local.ip(), *conn.remote.ip());
    let options: Vec<u8> = match conn.tsval {
        Some(ts) => [&[1u8, 1, 8, 10][..], &ts.to_be_bytes(), &0u32.to_be_bytes()].concat(),
        None => Vec::new(),
    };
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&conn.local.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&conn.remote.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&conn.snd_nxt.to_be_bytes());
    tcp[8..12].copy_from_slice(&conn.rcv_nxt.to_be_bytes());
    tcp[12] = (((20 + options.len()) / 4) as u8) << 4;
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&window.to_be_bytes());
    tcp.extend_from_slice(&options);
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&us.octets());
    pseudo[4..8].copy_from_slice(&peer.octets());
    pseudo[9] = libc::IPPROTO_TCP as u8;
    pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut packet = ipv4_header(us, peer, libc::IPPROTO_TCP as u8, tcp.len()).to_vec();
    packet.extend_from_slice(&tcp);
    Some(packet)
}

/// Sends each connection's nudge ([`ICMP_PER_CONNECTION`] ICMP host
/// unreachable, then one ACK) from inside the network namespace at
/// `netns`. Returns how many connections were nudged.
pub fn nudge(netns: &Path, connections: &[TcpConnection]) -> Result<usize, NudgeError> {
    if connections.is_empty() {
        return Ok(0);
    }
    let netns = netns.to_path_buf();
    let packets: Vec<(Ipv4Addr, Vec<Vec<u8>>)> = connections
        .iter()
        .map(|c| {
            let mut p = vec![icmp_host_unreachable(c); ICMP_PER_CONNECTION];
            p.extend(ack_segment(c));
            (*c.remote.ip(), p)
        })
        .collect();
    // setns changes only the calling thread's namespace: a thread of its
    // own, which then ends.
    std::thread::spawn(move || -> Result<usize, NudgeError> {
        crate::netns::enter(&netns)?;
        let socket = crate::sys::RawIpSocket::open()
            .map_err(|source| NudgeError::Io { context: format!("opening a raw IPv4 socket in {}", netns.display()), source })?;
        let mut nudged = 0;
        let mut first_error = None;
        for (peer, packets) in &packets {
            let sent = packets.iter().try_for_each(|p| socket.send_to(p, *peer));
            match sent {
                Ok(()) => nudged += 1,
                Err(source) => {
                    first_error.get_or_insert(NudgeError::Io { context: format!("sending a nudge to {peer}"), source });
                }
            }
        }
        match first_error {
            Some(e) if nudged == 0 => Err(e),
            _ => Ok(nudged),
        }
    })
    .join()
    .unwrap_or_else(|_| Err(NudgeError::Network(crate::NetworkError::Invalid("the nudge thread panicked".into()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> TcpConnection {
        TcpConnection {
            local: "10.232.7.10:7070".parse().unwrap(),
            remote: "10.232.7.9:41234".parse().unwrap(),
            rcv_nxt: 0x1122_3344,
            snd_nxt: 0xfeed_0001,
            window: Some(502),
            tsval: Some(0x0102_0304),
        }
    }

    /// A whole packet's checksum, taken again with the checksum in place,
    /// is zero (RFC 1071), here as `!0`'s complement: 0.
    fn verifies(parts: &[&[u8]]) -> bool {
        checksum(parts) == 0
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), !0xddf2);
        // An odd length is padded with a zero byte, wherever the split is.
        assert_eq!(checksum(&[&[0x01], &[0x02, 0x03]]), checksum(&[&[0x01, 0x02, 0x03, 0x00]]));
    }

    #[test]
    fn icmp_quotes_the_peers_segment_at_rcv_nxt() {
        let c = conn();
        let p = icmp_host_unreachable(&c);
        assert_eq!(p.len(), 20 + 8 + 28);
        // Outer header: ICMP from us to the peer, checksum right.
        assert_eq!(p[0], 0x45);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(p[9], 1);
        assert_eq!(&p[12..16], &[10, 232, 7, 10]);
        assert_eq!(&p[16..20], &[10, 232, 7, 9]);
        assert!(verifies(&[&p[..20]]));
        // ICMP: destination unreachable, host, checksum over the message.
        let icmp = &p[20..];
        assert_eq!((icmp[0], icmp[1]), (3, 1));
        assert!(verifies(&[icmp]));
        // Quoted: the peer's packet to us, TCP, its ports and sequence.
        let q = &icmp[8..];
        assert_eq!(q[9], 6);
        assert_eq!(&q[12..16], &[10, 232, 7, 9]);
        assert_eq!(&q[16..20], &[10, 232, 7, 10]);
        assert!(verifies(&[&q[..20]]));
        assert_eq!(u16::from_be_bytes([q[20], q[21]]), 41234);
        assert_eq!(u16::from_be_bytes([q[22], q[23]]), 7070);
        assert_eq!(u32::from_be_bytes(q[24..28].try_into().unwrap()), 0x1122_3344);
    }

    #[test]
    fn ack_carries_the_restored_sockets_numbers() {
        let c = conn();
        let p = ack_segment(&c).unwrap();
        assert_eq!(p.len(), 20 + 32);
        assert_eq!(p[9], 6);
        assert!(verifies(&[&p[..20]]));
        let tcp = &p[20..];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 7070);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 41234);
        assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0xfeed_0001, "seq = snd_nxt");
        assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 0x1122_3344, "ack = rcv_nxt");
        assert_eq!(tcp[12] >> 4, 8, "header of 32 bytes");
        assert_eq!(tcp[13], 0x10, "ACK only");
        assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 502);
        assert_eq!(&tcp[20..24], &[1, 1, 8, 10], "NOP NOP timestamp");
        assert_eq!(&tcp[24..28], &[1, 2, 3, 4]);
        assert_eq!(&tcp[28..32], &[0, 0, 0, 0]);
        // TCP checksum over the pseudo-header and the segment.
        let pseudo = [&p[12..20], &[0, 6], &(tcp.len() as u16).to_be_bytes()[..]].concat();
        assert!(verifies(&[&pseudo, tcp]));

        let plain = ack_segment(&TcpConnection { tsval: None, ..c.clone() }).unwrap();
        assert_eq!(plain.len(), 40);
        assert_eq!(plain[32] >> 4, 5);
        assert!(ack_segment(&TcpConnection { window: None, ..c }).is_none());
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn varint_field(out: &mut Vec<u8>, number: u32, v: u64) {
        put_varint(out, u64::from(number) << 3);
        put_varint(out, v);
    }

    fn bytes_field(out: &mut Vec<u8>, number: u32, b: &[u8]) {
        put_varint(out, (u64::from(number) << 3) | 2);
        put_varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    fn image(magic: u32, entries: &[Vec<u8>], tail: &[u8]) -> Vec<u8> {
        let mut out = [IMG_COMMON_MAGIC.to_le_bytes(), magic.to_le_bytes()].concat();
        for e in entries {
            out.extend_from_slice(&(e.len() as u32).to_le_bytes());
            out.extend_from_slice(e);
        }
        out.extend_from_slice(tail);
        out
    }

    fn inet_file(id: u32, ino: u32, state: u64, family: u64, packed_addresses: bool) -> Vec<u8> {
        let mut isk = Vec::new();
        varint_field(&mut isk, 1, u64::from(id));
        varint_field(&mut isk, 2, u64::from(ino));
        varint_field(&mut isk, 3, family);
        varint_field(&mut isk, 4, 1);
        varint_field(&mut isk, 5, 6);
        varint_field(&mut isk, 6, state);
        varint_field(&mut isk, 7, 7070);
        varint_field(&mut isk, 8, 41234);
        let src = u32::from_ne_bytes([10, 232, 7, 10]) as u64;
        let dst = u32::from_ne_bytes([10, 232, 7, 9]) as u64;
        if family == 10 {
            // ::ffff:10.232.7.10 and ::ffff:10.232.7.9, as CRIU writes them
            // (`packed_addresses`: 2001:db8::ffff:... instead, real IPv6).
            let first = if packed_addresses { u64::from(u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8])) } else { 0 };
            for (field, word) in [(11, src), (12, dst)] {
                for w in [first, 0, u64::from(u32::from_ne_bytes([0, 0, 0xff, 0xff])), word] {
                    varint_field(&mut isk, field, w);
                }
            }
        } else if packed_addresses {
            let (mut s, mut d) = (Vec::new(), Vec::new());
            put_varint(&mut s, src);
            put_varint(&mut d, dst);
            bytes_field(&mut isk, 11, &s);
            bytes_field(&mut isk, 12, &d);
        } else {
            varint_field(&mut isk, 11, src);
            varint_field(&mut isk, 12, dst);
        }
        // A fixed32 and a nested message the parser must step over.
        put_varint(&mut isk, (13 << 3) | 5);
        isk.extend_from_slice(&[0; 4]);
        bytes_field(&mut isk, 14, &[8, 1]);
        let mut file = Vec::new();
        varint_field(&mut file, 1, 4);
        varint_field(&mut file, 2, u64::from(id));
        bytes_field(&mut file, 4, &isk);
        file
    }

    fn reg_file(id: u32) -> Vec<u8> {
        let mut file = Vec::new();
        varint_field(&mut file, 1, 1);
        varint_field(&mut file, 2, u64::from(id));
        bytes_field(&mut file, 3, b"\x08\x01");
        file
    }

    fn tcp_stream_image(timestamps: bool) -> Vec<u8> {
        let mut e = Vec::new();
        varint_field(&mut e, 1, 0);
        varint_field(&mut e, 2, 0x1122_3344);
        varint_field(&mut e, 3, 300);
        varint_field(&mut e, 4, 0xfeed_0100);
        varint_field(&mut e, 5, if timestamps { 0x7 } else { 0x6 });
        varint_field(&mut e, 6, 7);
        varint_field(&mut e, 7, 1460);
        varint_field(&mut e, 8, 7);
        varint_field(&mut e, 9, 0x0102_0304);
        varint_field(&mut e, 12, 0xff);
        varint_field(&mut e, 16, 502 << 7);
        // The queues' raw bytes follow the entry.
        image(TCP_STREAM_MAGIC, &[e], &[0xaa; 300])
    }

    #[test]
    fn connections_are_read_from_criu_images() {
        let dir = tempfile::tempdir().unwrap();
        let files = image(
            FILES_MAGIC,
            &[
                reg_file(1),
                inet_file(2, 0x51, 1, 2, false),
                // The same socket behind a second descriptor.
                inet_file(3, 0x51, 1, 2, false),
                // Listening: not nudged, no stream image needed.
                inet_file(4, 0x52, 10, 2, false),
                inet_file(6, 0x54, 1, 2, true),
                // A dual-stack socket's IPv4 connection.
                inet_file(7, 0x55, 1, 10, false),
                // A real IPv6 connection: not nudged, no stream image needed.
                inet_file(8, 0x56, 1, 10, true),
            ],
            &[],
        );
        std::fs::write(dir.path().join("files.img"), files).unwrap();
        std::fs::write(dir.path().join("tcp-stream-51.img"), tcp_stream_image(true)).unwrap();
        std::fs::write(dir.path().join("tcp-stream-54.img"), tcp_stream_image(false)).unwrap();
        std::fs::write(dir.path().join("tcp-stream-55.img"), tcp_stream_image(true)).unwrap();
        let got = connections_from_images(dir.path()).unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[2], got[0], "the IPv4-mapped connection reads as IPv4");
        assert_eq!(got[0], conn());
        assert_eq!(got[1].tsval, None, "timestamps not negotiated");
        assert_eq!(got[1].remote, got[0].remote, "packed addresses read alike");
    }

    #[test]
    fn images_without_files_have_no_connections_and_bad_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(connections_from_images(dir.path()).unwrap().is_empty());
        std::fs::write(dir.path().join("files.img"), image(FILES_MAGIC, &[inet_file(2, 0x51, 1, 2, false)], &[])).unwrap();
        // The stream image is missing.
        assert!(matches!(connections_from_images(dir.path()), Err(NudgeError::Read { .. })));
        // Wrong magic.
        std::fs::write(dir.path().join("tcp-stream-51.img"), image(FILES_MAGIC, &[], &[])).unwrap();
        assert!(matches!(connections_from_images(dir.path()), Err(NudgeError::Image { .. })));
        // Truncated protobuf: an error, not a panic.
        let mut bad = inet_file(2, 0x51, 1, 2, false);
        bad.truncate(bad.len() - 3);
        std::fs::write(dir.path().join("files.img"), image(FILES_MAGIC, &[bad], &[])).unwrap();
        assert!(connections_from_images(dir.path()).is_err());
    }

    #[test]
    fn varints_and_bad_wire_types() {
        let mut b: &[u8] = &[0xac, 0x02];
        assert_eq!(varint(&mut b), Ok(300));
        let mut b: &[u8] = &[0x80];
        assert!(varint(&mut b).is_err());
        assert!(fields(&[0x0b]).next().unwrap().is_err(), "wire type 3 (groups) is refused");
    }
}
