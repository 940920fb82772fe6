//! A nudge makes a backed-off peer retransmit at once (root: network
//! namespaces, nftables).
//!
//! A client namespace and a server namespace joined by a veth pair; the
//! client writes to the server every 20 ms. The server's namespace is
//! locked as a migration locks a container's ([`container_network::lock`]),
//! until the client has timed out three times (its next timeout is then
//! 1.6 s away), and unlocked 300 ms after its third retransmission. Without
//! a nudge the server next hears from the client at that timeout; with
//! one, sent right after the unlock with the numbers a dump records
//! (repair mode, as CRIU reads them), within 100 ms.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_network::nudge::{nudge, TcpConnection};
use container_network::{lock, Netns};

fn can_run() -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not root".to_string())
    } else if Command::new("nft").arg("--version").output().is_err() || Command::new("ip").arg("-V").output().is_err() {
        Some("nft or ip not installed (run ./install.sh)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("CTMIGRATE_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") => {
            panic!("root test cannot run: {why} (CTMIGRATE_REQUIRE_ROOT_TESTS=1)")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}; set up with ./install.sh and run as root");
            false
        }
    }
}

/// Two namespaces, `nudge-c-<pid>` (10.251.x.1) and `nudge-s-<pid>`
/// (10.251.x.2), joined by a veth pair; removed on drop.
struct Pair {
    client: Netns,
    server: Netns,
    client_ip: Ipv4Addr,
    server_ip: Ipv4Addr,
}

impl Pair {
    fn create() -> Pair {
        let pid = std::process::id();
        let x = (pid % 250) as u8;
        let client = Netns::create_named(&format!("nudge-c-{pid}")).expect("client namespace");
        let server = Netns::create_named(&format!("nudge-s-{pid}")).expect("server namespace");
        let pair = Pair { client, server, client_ip: Ipv4Addr::new(10, 251, x, 1), server_ip: Ipv4Addr::new(10, 251, x, 2) };
        let (c, s) = (pair.client.name().unwrap(), pair.server.name().unwrap());
        let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        ip(&["link", "add", "nudge-vc", "netns", &c, "type", "veth", "peer", "name", "nudge-vs", "netns", &s]);
        for (ns, dev, addr) in [(&c, "nudge-vc", pair.client_ip), (&s, "nudge-vs", pair.server_ip)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.client.remove();
        let _ = self.server.remove();
    }
}

/// Runs `f` in a thread inside `ns` (sockets it makes stay there).
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        nix::sched::setns(std::fs::File::open(path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn setsockopt(fd: i32, opt: i32, value: i32) {
    // SAFETY: `value` is a live i32 for the call; the length says so.
    let r = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, opt, (&value as *const i32).cast(), 4) };
    assert_eq!(r, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
}

fn getsockopt<const N: usize>(fd: i32, opt: i32) -> [u8; N] {
    let mut buf = [0u8; N];
    let mut len = N as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes, and `len` is a live socklen_t.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, opt, buf.as_mut_ptr().cast(), &mut len) };
    assert_eq!(r, 0, "getsockopt {opt}: {}", std::io::Error::last_os_error());
    buf
}

/// What a dump records of the server's socket, read as CRIU reads it: in
/// repair mode (left without a window probe).
fn dumped(server: &TcpStream) -> TcpConnection {
    const TCP_REPAIR: i32 = 19;
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_QUEUE_SEQ: i32 = 21;
    const TCP_TIMESTAMP: i32 = 24;
    const TCP_REPAIR_WINDOW: i32 = 29;
    const TCP_REPAIR_OFF_NO_WP: i32 = -1;
    let fd = server.as_raw_fd();
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
    // tcpi_options bit 0: timestamps; byte 6's high nibble: our receive scale.
    let info: [u8; 8] = getsockopt(fd, libc::TCP_INFO);
    setsockopt(fd, TCP_REPAIR, 1);
    setsockopt(fd, TCP_REPAIR_QUEUE, 1);
    let rcv_nxt = u32_at(&getsockopt::<4>(fd, TCP_QUEUE_SEQ), 0);
    setsockopt(fd, TCP_REPAIR_QUEUE, 2);
    let snd_nxt = u32_at(&getsockopt::<4>(fd, TCP_QUEUE_SEQ), 0);
    let ts = u32_at(&getsockopt::<4>(fd, TCP_TIMESTAMP), 0);
    // struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    let window = getsockopt::<20>(fd, TCP_REPAIR_WINDOW);
    setsockopt(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    let rcv_wscale = u32::from(info[6] >> 4);
    TcpConnection {
        local: match server.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        },
        remote: match server.peer_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        },
        rcv_nxt,
        snd_nxt,
        window: Some(u16::try_from(u32_at(&window, 12) >> rcv_wscale).unwrap_or(u16::MAX)),
        tsval: (info[5] & 1 != 0).then_some(ts),
    }
}

/// The client's `tcpi_backoff`.
fn backoff(client: &TcpStream) -> u8 {
    getsockopt::<8>(client.as_raw_fd(), libc::TCP_INFO)[4]
}

/// One locked, backed-off connection, unlocked (and nudged if `nudged`):
/// how long after the unlock the server read the client's data again, and
/// the client's backoff at the unlock.
fn retransmit_delay(pair: &Pair, port: u16, nudged: bool) -> (Duration, u8) {
    let addr = SocketAddrV4::new(pair.server_ip, port);
    let listener = in_netns(&pair.server, move || TcpListener::bind(addr).unwrap());
    let client = in_netns(&pair.client, move || TcpStream::connect(addr).unwrap());
    let (server, _) = listener.accept().unwrap();
    let reads: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (mut s, reads) = (server.try_clone().unwrap(), reads.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {
                reads.lock().unwrap().push(Instant::now());
            }
        })
    };
    let writer = {
        let (mut c, stop) = (client.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if c.write_all(&[b'x'; 100]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    lock::lock(&pair.server).expect("locking the server's namespace");
    let conn = dumped(&server);
    // Three timeouts (about 0.2, 0.6 and 1.4 s after the lock), then 300 ms
    // more: more than the client's base RTO since its last retransmission,
    // and 1.3 s before its next.
    let deadline = Instant::now() + Duration::from_secs(10);
    while backoff(&client) < 3 {
        assert!(Instant::now() < deadline, "the client never backed off three times");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(300));
    let backed_off = backoff(&client);
    lock::unlock(&pair.server).expect("unlocking");
    let unlocked = Instant::now();
    if nudged {
        assert_eq!(nudge(&pair.server.path(), &[conn]).expect("nudging"), 1);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let heard = loop {
        if let Some(t) = reads.lock().unwrap().iter().find(|t| **t > unlocked) {
            break *t;
        }
        assert!(Instant::now() < deadline, "the server never heard from the client again");
        std::thread::sleep(Duration::from_millis(1));
    };
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = server.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
    (heard - unlocked, backed_off)
}

#[test]
fn a_nudge_makes_a_backed_off_peer_retransmit_at_once() {
    if !can_run() {
        return;
    }
    let pair = Pair::create();
    let (without, backoff_without) = retransmit_delay(&pair, 7101, false);
    let (with, backoff_with) = retransmit_delay(&pair, 7102, true);
    eprintln!(
        "the client retransmitted {} ms after the unlock without a nudge (backoff {backoff_without}), {} ms after it with one (backoff {backoff_with})",
        without.as_millis(),
        with.as_millis()
    );
    assert!(without >= Duration::from_millis(500), "without a nudge the client retransmitted after only {without:?}: the set-up did not back it off");
    assert!(with <= Duration::from_millis(100), "with a nudge the client retransmitted {with:?} after the unlock (without: {without:?})");
}
