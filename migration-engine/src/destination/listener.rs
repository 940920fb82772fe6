//! A receiver's accept loop: many connections at once, none able to stall
//! the others.
//!
//! Each accepted connection gets a thread of its own. Until its sender's
//! Hello has arrived (TCP accept, then the TLS handshake, then the Hello
//! frame) the connection is *handshaking*, and three things bound it:
//!
//! - one deadline for the whole handshake (`--handshake-timeout`), kept by
//!   one watchdog thread ([`Deadlines`]) that shuts the socket down when it
//!   passes, however the peer trickles its bytes;
//! - at most `--max-handshakes` handshaking connections in all, and
//!   `--max-handshakes-per-ip` from one address ([`HandshakeSlots`]); a
//!   connection over either is closed as soon as it is accepted, before
//!   any thread or buffer is given to it, with one event and one audit line;
//! - nothing is read before the Hello but the TLS handshake's records and
//!   the Hello itself, whose claimed size is checked first (see
//!   `receiver::establish`).
//!
//! What follows the handshake (the migration slots, the destination ids and
//! the staging memory) is [`crate::admission`]'s.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::events::{Event, ResultEvent};
use crate::Reporter;

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
pub const DEFAULT_MAX_HANDSHAKES_PER_IP: usize = 8;

/// The handshake's bounds (receiver options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// `--handshake-timeout`: from accept to the sender's Hello, in all.
    pub timeout: Duration,
    /// `--max-handshakes`.
    pub max_total: usize,
    /// `--max-handshakes-per-ip`.
    pub max_per_ip: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self { timeout: DEFAULT_HANDSHAKE_TIMEOUT, max_total: DEFAULT_MAX_HANDSHAKES, max_per_ip: DEFAULT_MAX_HANDSHAKES_PER_IP }
    }
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverBound {
    #[error("{max} connections are already in their handshake (--max-handshakes {max}); closed")]
    Total { max: usize },
    #[error("{max} connections from {ip} are already in their handshake (--max-handshakes-per-ip {max}); closed")]
    PerIp { ip: IpAddr, max: usize },
}

/// A connection that did not finish its handshake in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the peer did not finish its handshake (TLS and Hello) within {0:?} (--handshake-timeout)")]
pub struct HandshakeExpired(pub Duration);

/// Counts of handshaking connections, in all and by peer address.
#[derive(Debug)]
pub struct HandshakeSlots {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One handshaking connection's place; given back on drop.
#[derive(Debug)]
pub struct HandshakeSlot<'a> {
    owner: &'a HandshakeSlots,
    ip: IpAddr,
}

impl HandshakeSlots {
    pub fn new(limits: &HandshakeLimits) -> Self {
        Self { max_total: limits.max_total.max(1), max_per_ip: limits.max_per_ip.max(1), state: Mutex::new((0, HashMap::new())) }
    }

    pub fn try_enter(&self, ip: IpAddr) -> Result<HandshakeSlot<'_>, OverBound> {
        let ip = ip.to_canonical();
        let mut st = self.state.lock().unwrap();
        if st.0 >= self.max_total {
            return Err(OverBound::Total { max: self.max_total });
        }
        let from_ip = st.1.entry(ip).or_insert(0);
        if *from_ip >= self.max_per_ip {
            return Err(OverBound::PerIp { ip, max: self.max_per_ip });
        }
        *from_ip += 1;
        st.0 += 1;
        Ok(HandshakeSlot { owner: self, ip })
    }

    /// Handshaking connections now, in all.
    pub fn in_use(&self) -> usize {
        self.state.lock().unwrap().0
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        let mut st = self.owner.state.lock().unwrap();
        st.0 -= 1;
        if let Some(n) = st.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&self.ip);
            }
        }
    }
}

/// Sockets with a deadline, and the thread ([`Deadlines::watch`]) that
/// shuts each down when its deadline passes.
#[derive(Debug, Default)]
pub struct Deadlines {
    state: Mutex<DeadlineState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct DeadlineState {
    next: u64,
    armed: BTreeMap<(Instant, u64), TcpStream>,
    stopping: bool,
}

/// A socket's deadline, armed; dropping it disarms it.
#[derive(Debug)]
pub struct Armed<'a> {
    owner: &'a Deadlines,
    key: (Instant, u64),
}

impl Deadlines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Shuts `socket` down at `at` unless disarmed before.
    pub fn arm(&self, socket: &TcpStream, at: Instant) -> std::io::Result<Armed<'_>> {
        let clone = socket.try_clone()?;
        let mut st = self.state.lock().unwrap();
        let key = (at, st.next);
        st.next += 1;
        if st.stopping {
            let _ = clone.shutdown(std::net::Shutdown::Both);
        } else {
            st.armed.insert(key, clone);
        }
        self.wake.notify_all();
        Ok(Armed { owner: self, key })
    }

    /// Keeps the deadlines until [`stop`](Self::stop); run it on a thread.
    pub fn watch(&self) {
        let mut st = self.state.lock().unwrap();
        while !st.stopping {
            let now = Instant::now();
            match st.armed.keys().next().copied() {
                Some(key) if key.0 <= now => {
                    if let Some(s) = st.armed.remove(&key) {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
                Some(key) => st = self.wake.wait_timeout(st, key.0 - now).unwrap().0,
                None => st = self.wake.wait(st).unwrap(),
            }
        }
    }

    /// Ends [`watch`](Self::watch) and shuts down every socket still armed.
    pub fn stop(&self) {
        let mut st = self.state.lock().unwrap();
        st.stopping = true;
        for (_, s) in std::mem::take(&mut st.armed) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.wake.notify_all();
    }
}

impl Armed<'_> {
    /// Disarms: true if in time, false if the deadline had passed (and the
    /// socket was shut down).
    pub fn disarm(self) -> bool {
        self.owner.state.lock().unwrap().armed.remove(&self.key).is_some()
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.owner.state.lock().unwrap().armed.remove(&self.key);
    }
}

/// A [`Deadlines`] with its own watching thread, stopped on drop (the
/// sender's, for its connect-to-HelloAck deadline).
pub struct Watchdog {
    deadlines: std::sync::Arc<Deadlines>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start() -> Self {
        let deadlines = std::sync::Arc::new(Deadlines::new());
        let watching = deadlines.clone();
        Self { deadlines, thread: Some(std::thread::spawn(move || watching.watch())) }
    }

    pub fn arm(&self, socket: &TcpStream, at: Instant) -> std::io::Result<Armed<'_>> {
        self.deadlines.arm(socket, at)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.deadlines.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection in its handshake: its slot and its deadline. The handler
/// calls [`finish`](Self::finish) when the sender's Hello has arrived.
pub struct Handshake<'a> {
    slot: HandshakeSlot<'a>,
    deadline: Armed<'a>,
    timeout: Duration,
}

impl Handshake<'_> {
    /// Ends the handshake: the connection no longer counts against the
    /// bounds. An error if its deadline passed first.
    pub fn finish(self) -> Result<(), HandshakeExpired> {
        let in_time = self.deadline.disarm();
        drop(self.slot);
        if in_time {
            Ok(())
        } else {
            Err(HandshakeExpired(self.timeout))
        }
    }

    /// The handshake's whole allowance (for socket timeouts).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// How often the accept loop looks at its stop conditions.
const POLL: Duration = Duration::from_millis(100);

/// Accepts connections until interrupted (or, with `once`, until one
/// handler returns a result), each on a thread of its own running
/// `handler`. A handler returns `Some` for a migration that got past the
/// handshake, `None` for a connection that did not (which never ends a
/// `once` loop). Returns the results, in the order they came; the threads
/// have all ended by then (handshakes still under way are cut).
pub fn serve<R, H>(
    listener: &TcpListener,
    limits: &HandshakeLimits,
    once: bool,
    rep: &Reporter,
    audit_log: &Path,
    handler: H,
) -> std::io::Result<Vec<R>>
where
    R: Send,
    H: Fn(TcpStream, Handshake<'_>) -> Option<R> + Sync,
{
    listener.set_nonblocking(true)?;
    let slots = HandshakeSlots::new(limits);
    let deadlines = Deadlines::new();
    let (tx, rx) = std::sync::mpsc::channel::<R>();
    let mut results = Vec::new();
    std::thread::scope(|scope| {
        scope.spawn(|| deadlines.watch());
        loop {
            if let Ok(r) = rx.try_recv() {
                results.push(r);
                if once {
                    break;
                }
            }
            if crate::interrupt::interrupted() {
                break;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                    use std::os::fd::AsFd;
                    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(POLL.as_millis() as u16));
                    continue;
                }
                Err(e) => {
                    rep.warn(format!("accept failed: {e}"));
                    // Out of file descriptors, say: not a busy loop.
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            let Ok(peer) = stream.peer_addr() else { continue };
            let slot = match slots.try_enter(peer.ip()) {
                Ok(slot) => slot,
                Err(over) => {
                    // Closed now: no thread, no buffer.
                    drop(stream);
                    refused_at_bound(rep, audit_log, &peer.to_string(), &over);
                    continue;
                }
            };
            let _ = stream.set_nonblocking(false);
            let deadline = match deadlines.arm(&stream, Instant::now() + limits.timeout) {
                Ok(d) => d,
                Err(e) => {
                    rep.warn(format!("connection from {peer}: {e}"));
                    continue;
                }
            };
            let handshake = Handshake { slot, deadline, timeout: limits.timeout };
            let (tx, handler) = (tx.clone(), &handler);
            let spawned = std::thread::Builder::new().name(format!("conn-{peer}")).spawn_scoped(scope, move || {
                if let Some(r) = handler(stream, handshake) {
                    let _ = tx.send(r);
                }
            });
            if let Err(e) = spawned {
                rep.warn(format!("connection from {peer}: cannot start a thread for it: {e}"));
            }
        }
        // Handshakes still under way have nothing to finish for.
        deadlines.stop();
    });
    drop(tx);
    results.extend(rx.try_iter());
    Ok(results)
}

/// The one event and the one audit line of a connection closed at a bound.
fn refused_at_bound(rep: &Reporter, audit_log: &Path, peer: &str, over: &OverBound) {
    rep.emit(Event::Rejected { peer: peer.to_string(), reason: over.to_string() });
    let result = ResultEvent {
        role: "receiver",
        error: Some(format!("connection refused: {over}")),
        exit_code: Some(crate::Outcome::NothingTouched.exit_code()),
        ..Default::default()
    };
    let _ = crate::audit::record(audit_log, &format!("unauthenticated:{peer}"), &result);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handshakes_are_bounded_in_all_and_per_address() {
        let slots = HandshakeSlots::new(&HandshakeLimits { max_total: 3, max_per_ip: 2, ..Default::default() });
        let a1 = slots.try_enter(ip("10.0.0.1")).unwrap();
        let a2 = slots.try_enter(ip("10.0.0.1")).unwrap();
        assert_eq!(slots.try_enter(ip("10.0.0.1")).unwrap_err(), OverBound::PerIp { ip: ip("10.0.0.1"), max: 2 });
        // The same address spelled as IPv4-mapped IPv6 counts as itself.
        assert!(matches!(slots.try_enter(ip("::ffff:10.0.0.1")), Err(OverBound::PerIp { .. })));
        let b1 = slots.try_enter(ip("10.0.0.2")).unwrap();
        assert_eq!(slots.try_enter(ip("10.0.0.3")).unwrap_err(), OverBound::Total { max: 3 });
        assert_eq!(slots.in_use(), 3);
        drop(a1);
        let c1 = slots.try_enter(ip("10.0.0.3")).unwrap();
        drop((a2, b1, c1));
        assert_eq!(slots.in_use(), 0);
        let msg = OverBound::PerIp { ip: ip("10.0.0.1"), max: 8 }.to_string();
        assert!(msg.contains("--max-handshakes-per-ip 8") && !msg.contains('\n'), "{msg}");
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap().0)
    }

    #[test]
    fn a_deadline_cuts_a_silent_peer_once_in_all() {
        use std::io::{Read, Write};
        let d = Deadlines::new();
        std::thread::scope(|s| {
            s.spawn(|| d.watch());
            let (mut client, mut server) = pair();
            let started = Instant::now();
            let armed = d.arm(&server, started + Duration::from_millis(300)).unwrap();
            // A peer that trickles a byte every 100 ms is cut all the same.
            let trickle = s.spawn(move || {
                for _ in 0..20 {
                    if client.write_all(b"x").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let mut buf = [0u8; 1];
            while matches!(server.read(&mut buf), Ok(1)) {}
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(290) && took < Duration::from_millis(1500), "{took:?}");
            assert!(!armed.disarm(), "the deadline had passed");
            // One disarmed in time leaves its socket alone.
            let (mut c2, mut s2) = pair();
            let armed = d.arm(&s2, Instant::now() + Duration::from_millis(200)).unwrap();
            assert!(armed.disarm());
            std::thread::sleep(Duration::from_millis(300));
            c2.write_all(b"y").unwrap();
            s2.read_exact(&mut buf).unwrap();
            d.stop();
            trickle.join().unwrap();
        });
    }

    #[test]
    fn stopping_cuts_what_is_still_armed() {
        use std::io::Read;
        let d = Deadlines::new();
        let (_client, mut server) = pair();
        let _armed = d.arm(&server, Instant::now() + Duration::from_secs(60)).unwrap();
        d.stop();
        assert_eq!(server.read(&mut [0u8; 1]).unwrap(), 0);
    }
}
