//! Post-copy on the destination: the restore leaves anonymous memory to
//! CRIU's lazy-pages daemon, started here before it, whose page requests
//! go to the source over the migration's connection and whose answers
//! come back the same way (see the source's `postcopy` module for the
//! whole exchange). The copy runs once the source says so, on a lease the
//! source renews on request; it is committed only after every page is
//! here, with the usual Commit.
//!
//! Until the Commit the copy is not the container: a lease that runs out,
//! a daemon that dies, a bad page answer, an Abort or a lost connection
//! each kill and remove it, and only then is the source told (it thaws on
//! that word, or when the lease has surely run out). A receiver that dies
//! or stops cannot keep the lease: the lease guard
//! ([`crate::lease_guard`]) kills the copy then.

use super::*;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use criu_bindings::lazy::{self, DaemonRequest, LazyPagesDaemon, PageReply};
use migration_protocol::{PagesComplete, RunOnLease, LEASE_MAX_MS, LEASE_MIN_MS};

use crate::lease_guard::{monotonic_ms, LeaseGuard};

/// The daemon's socket buffer on our side: a few 4 MiB answers.
const DAEMON_SOCKET_BUFFER: usize = 8 << 20;

/// The lazy-pages daemon, our end of its page-server socket, and the
/// requests of its that the source has not answered yet.
pub(super) struct LazyDestination {
    daemon: LazyPagesDaemon,
    socket: UnixStream,
    /// GETs sent on, oldest first: `(pid, vaddr, nr_pages)`.
    outstanding: VecDeque<(u64, u64, u64)>,
    /// The daemon asked to close, and the source's status reached it.
    close_asked: bool,
    closed: bool,
    /// Pages that came, and of those the single pages faults asked for.
    pages: u64,
    fault_pages: u64,
}

impl LazyDestination {
    /// Starts the daemon on the final images, listening in CRIU's work
    /// directory `work` before the restore starts.
    pub(super) fn start(images: &Path, work: &Path) -> Result<Self, MigrationError> {
        use nix::sys::socket::{setsockopt, socketpair, sockopt, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| MigrationError::Other(format!("creating the lazy-pages daemon's socket: {e}")))?;
        let _ = setsockopt(&ours, sockopt::SndBufForce, &DAEMON_SOCKET_BUFFER);
        let mut daemon = LazyPagesDaemon::start(&criu_bindings::default_binary(), images, work, "lazy-pages.log", theirs)
            .map_err(MigrationError::io("starting criu lazy-pages"))?;
        daemon.wait_listening(Duration::from_secs(10)).map_err(MigrationError::Remote)?;
        Ok(Self {
            daemon,
            socket: UnixStream::from(ours),
            outstanding: VecDeque::new(),
            close_asked: false,
            closed: false,
            pages: 0,
            fault_pages: 0,
        })
    }

    /// Passes one request of the daemon on to the source. False once the
    /// daemon closed its socket.
    fn forward_request(&mut self, writer: &mut FrameWriter<BufWriter<crate::tls::Conn>>) -> Result<bool, MigrationError> {
        let Some(raw) = lazy::read_header(&mut self.socket).map_err(MigrationError::io("reading criu lazy-pages' requests"))? else {
            return Ok(false);
        };
        match DaemonRequest::parse(&raw).map_err(|e| MigrationError::Other(format!("criu lazy-pages sent {e}")))? {
            DaemonRequest::Get { pid, vaddr, nr_pages } => {
                self.outstanding.push_back((pid, vaddr, nr_pages));
                if nr_pages == 1 {
                    self.fault_pages += 1;
                }
            }
            DaemonRequest::Close { .. } => self.close_asked = true,
        }
        writer.write_frame(MessageKind::LazyRequest, &raw)?;
        writer.flush()?;
        Ok(true)
    }

    /// Hands the source's answer to the daemon, checked against the
    /// oldest request.
    fn deliver(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let bad = |why: String| MigrationError::BadStream(format!("post-copy: {why}"));
        if self.close_asked && self.outstanding.is_empty() && !self.closed {
            let status: [u8; 4] = payload.try_into().map_err(|_| bad("a close status that is not 4 bytes".into()))?;
            self.socket.write_all(&status).map_err(MigrationError::io("answering criu lazy-pages"))?;
            self.closed = true;
            return Ok(());
        }
        let asked = self.outstanding.pop_front().ok_or_else(|| bad("pages no one asked for".into()))?;
        let header: [u8; lazy::HEADER_LEN] = payload.get(..lazy::HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or_else(|| bad("a page answer cut short".into()))?;
        let reply = PageReply::parse(&header, asked).map_err(|e| bad(e.to_string()))?;
        if payload.len() as u64 != lazy::HEADER_LEN as u64 + reply.data_len() {
            return Err(bad(format!("a page answer of {} bytes for {} pages", payload.len(), reply.nr_pages)));
        }
        self.pages += reply.nr_pages;
        self.socket.write_all(payload).map_err(MigrationError::io("answering criu lazy-pages"))
    }
}

/// The copy's lease as the destination keeps it.
struct Lease {
    duration_ms: u64,
    /// CLOCK_MONOTONIC ms at which it ends.
    until_ms: u64,
    /// Renewal requests not answered yet: their number and when each went.
    asked: HashMap<u64, u64>,
    next: u64,
    last_asked_ms: u64,
}

impl Lease {
    /// A lease granted in answer to a message sent at `asked_ms`: it runs
    /// from then, not from its arrival.
    fn new(duration_ms: u64, asked_ms: u64) -> Self {
        Self { duration_ms, until_ms: asked_ms + duration_ms, asked: HashMap::new(), next: 0, last_asked_ms: asked_ms }
    }
}

impl<'a> Session<'a> {
    /// After Ready: relays the copy's page requests, runs it when the
    /// source says, keeps its lease, and returns once every page is here
    /// and the source's Commit came. A failure removes the copy before it
    /// returns.
    pub(super) fn postcopy(&mut self, manifest: &Manifest, ready_sent_ms: u64) -> Result<(), (MigrationError, Outcome)> {
        let mut guard = None;
        let outcome = self.relay_postcopy(manifest, ready_sent_ms, &mut guard);
        if let Err((e, _)) = &outcome {
            // The copy goes before the source hears of the failure (it
            // thaws on that word).
            self.rep.warn(format!("post-copy failed ({e}); removing the copy that ran here"));
            if let Some(mut lazy) = self.lazy.take() {
                lazy.daemon.kill();
            }
            if let Some(st) = self.staging.as_ref() {
                self.host.remove(&st.dest_id, &st.bundle);
            }
            if let Some(g) = guard.take() {
                g.removed();
            }
        }
        outcome
    }

    /// One round of the relay: a request of the daemon goes on to the
    /// source, a page answer of the source goes on to the daemon. Returns
    /// any other frame the source sent.
    fn relay_once(&mut self, conn_socket: &std::net::TcpStream, wait_ms: u16) -> Result<Option<Frame>, MigrationError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let lazy = self.lazy.as_mut().expect("the daemon runs");
        let (conn_ready, daemon_ready) = if self.control.has_buffered() {
            (true, false)
        } else {
            let mut fds = [PollFd::new(conn_socket.as_fd(), PollFlags::POLLIN), PollFd::new(lazy.socket.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(wait_ms)).map_err(|e| MigrationError::Other(format!("poll: {e}")))?;
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]) && !lazy.closed)
        };
        if daemon_ready && !lazy.forward_request(&mut self.writer)? {
            // The daemon ended: its exit status says how.
            std::thread::sleep(Duration::from_millis(5));
        }
        if !conn_ready {
            return Ok(None);
        }
        let frame = self.read()?;
        if frame.kind != MessageKind::LazyReply {
            return Ok(Some(frame));
        }
        self.lazy.as_mut().expect("the daemon runs").deliver(&frame.payload)?;
        self.reader.recycle(frame);
        Ok(None)
    }

    /// Relays pages until `done` (the restore, which may fault on memory
    /// still on the source). On failure the daemon is killed, so that the
    /// restore waiting on it ends.
    pub(super) fn relay_during(&mut self, done: impl Fn() -> bool) -> Result<(), MigrationError> {
        let relayed = (|| -> Result<(), MigrationError> {
            let conn_socket = self.conn_socket()?;
            while !done() {
                if let Some(frame) = self.relay_once(&conn_socket, 20)? {
                    return Err(MigrationError::BadStream(format!("post-copy: a {:?} message during the restore", frame.kind)));
                }
            }
            Ok(())
        })();
        if relayed.is_err() {
            if let Some(lazy) = self.lazy.as_mut() {
                lazy.daemon.kill();
            }
        }
        relayed
    }

    fn conn_socket(&self) -> Result<std::net::TcpStream, MigrationError> {
        match self.control.socket.as_ref() {
            Some(s) => s.try_clone().map_err(MigrationError::io("socket")),
            None => Err(MigrationError::BadStream("post-copy needs a socket connection".into())),
        }
    }

    fn relay_postcopy(&mut self, manifest: &Manifest, ready_sent_ms: u64, guard: &mut Option<LeaseGuard>) -> Result<(), (MigrationError, Outcome)> {
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        let bad = |why: String| resumed(MigrationError::BadStream(format!("post-copy: {why}")));
        let conn_socket = self.conn_socket().map_err(resumed)?;
        let mut lease: Option<Lease> = None;
        let mut ran_at: Option<Instant> = None;
        let mut complete_sent = false;
        let mut last_heard = Instant::now();
        loop {
            // The lease, kept here as well as by the guard.
            if let Some(l) = lease.as_mut() {
                if monotonic_ms() >= l.until_ms {
                    return Err(resumed(MigrationError::Other(format!("the source renewed no lease for {} ms", l.duration_ms))));
                }
                if monotonic_ms() >= l.last_asked_ms + l.duration_ms / 4 {
                    let seq = l.next;
                    l.next += 1;
                    l.last_asked_ms = monotonic_ms();
                    l.asked.insert(seq, l.last_asked_ms);
                    self.writer.write_frame(MessageKind::LeaseRenewal, &seq.to_le_bytes()).map_err(|e| resumed(e.into()))?;
                    self.writer.flush().map_err(|e| resumed(e.into()))?;
                }
            } else if last_heard.elapsed() > self.opts.io_timeout {
                return Err(resumed(MigrationError::Aborted(format!("post-copy: nothing from the source for {} s", self.opts.io_timeout.as_secs()))));
            }
            // The daemon ends after its last page (and its close).
            if !complete_sent {
                let lazy = self.lazy.as_mut().expect("the daemon runs");
                if let Some(status) = lazy.daemon.try_wait().map_err(|e| resumed(MigrationError::io("criu lazy-pages")(e)))? {
                    if !(status.success() && lazy.closed) {
                        return Err(resumed(MigrationError::Other(format!("criu lazy-pages ended ({status}) before every page arrived{}", lazy.daemon.log_errors()))));
                    }
                    let faults = lazy.daemon.faults_served();
                    let complete = PagesComplete {
                        faults,
                        pages: lazy.pages,
                        background_pages: lazy.pages.saturating_sub(lazy.fault_pages),
                        after_run_ms: ran_at.map(|r| r.elapsed().as_millis() as u64).unwrap_or(0),
                    };
                    let pages = lazy.pages;
                    self.writer.write_json(MessageKind::PagesComplete, &complete).map_err(|e| resumed(e.into()))?;
                    self.writer.flush().map_err(|e| resumed(e.into()))?;
                    self.rep.warn(format!("post-copy: every page is here ({pages} pages, {faults} faults served on demand)"));
                    complete_sent = true;
                }
            }
            let Some(frame) = self.relay_once(&conn_socket, 50).map_err(resumed)? else { continue };
            last_heard = Instant::now();
            match frame.kind {
                MessageKind::RunOnLease if lease.is_none() => {
                    let run: RunOnLease = frame.json().map_err(|e| resumed(e.into()))?;
                    if !(LEASE_MIN_MS..=LEASE_MAX_MS).contains(&run.lease_ms) {
                        return Err(bad(format!("a lease of {} ms (from {LEASE_MIN_MS} to {LEASE_MAX_MS})", run.lease_ms)));
                    }
                    let granted = Lease::new(run.lease_ms, ready_sent_ms);
                    self.run_on_lease(manifest, &granted, guard)?;
                    lease = Some(granted);
                    ran_at = Some(Instant::now());
                }
                MessageKind::LeaseRenewal if lease.is_some() => {
                    let l = lease.as_mut().expect("checked");
                    let seq = frame.payload.as_slice().try_into().map(u64::from_le_bytes).map_err(|_| bad("a lease renewal that is not 8 bytes".into()))?;
                    let asked_ms = l.asked.remove(&seq).ok_or_else(|| bad(format!("a renewal of lease request {seq}, never made")))?;
                    l.until_ms = l.until_ms.max(asked_ms + l.duration_ms);
                    if let Some(g) = guard.as_mut() {
                        g.extend(l.until_ms);
                    }
                }
                MessageKind::Commit if complete_sent && lease.is_some() => break,
                other => return Err(bad(format!("a {other:?} message"))),
            }
        }
        // Committing: the guard stands down first, or the copy is gone.
        if let Some(g) = guard.take() {
            if !g.stand_down() {
                return Err(resumed(MigrationError::Other("the copy's lease ran out as the Commit came; the lease guard removed it".into())));
            }
        }
        if let Some(mut lazy) = self.lazy.take() {
            let _ = lazy.daemon.wait();
        }
        Ok(())
    }

    /// The source's RunOnLease: the lease guard first, journalled, then
    /// the copy's network up and its tasks let run.
    fn run_on_lease(&mut self, manifest: &Manifest, lease: &Lease, guard: &mut Option<LeaseGuard>) -> Result<(), (MigrationError, Outcome)> {
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        if monotonic_ms() >= lease.until_ms {
            return Err(resumed(MigrationError::Other("the lease had run out when it arrived".into())));
        }
        let st = self.staging.as_ref().expect("staging exists");
        let exe = std::env::current_exe().map_err(|e| resumed(MigrationError::io("finding ctmigrate's own binary")(e)))?;
        *guard = Some(LeaseGuard::spawn(&exe, self.runc, &manifest.dest_id, &st.bundle, lease.until_ms).map_err(resumed)?);
        self.step(DestinationEvent::RunOnLease).map_err(resumed)?;
        failpoint!("receiver-before-run-on-lease").map_err(resumed)?;
        let plan = match &self.entry.as_ref().expect("admitted").side {
            Side::Destination { plan, .. } => plan.clone(),
            Side::Source { .. } => unreachable!("a receiver's entry is a destination entry"),
        };
        self.host.run(&plan, &manifest.dest_id).map_err(resumed)?;
        self.copy_runs();
        self.nudge_peers();
        self.rep.warn(format!("post-copy: `{}` runs on a {} ms lease while its memory arrives", manifest.dest_id, lease.duration_ms));
        Ok(())
    }
}
