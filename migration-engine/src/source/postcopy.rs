//! Post-copy on the source: CRIU's lazy dump writes every image but the
//! anonymous memory, which it keeps and serves on request over a socket
//! (the project's CRIU patches 0002 and 0003 make that work here and let
//! the socket be ours). The images go as usual; then this side relays the
//! destination's page requests to CRIU and CRIU's pages back, over the
//! migration's own connection, until the destination holds every page.
//!
//! ```text
//!  source (frozen, memory whole)                   destination
//!  images ---------------------------------------> restore, tasks stopped
//!         <--------------------------------------- Ready
//!  journal postcopy-running, RunOnLease ---------> run the copy (on the lease)
//!  CRIU <- LazyRequest <--------------------------- lazy-pages daemon (faults,
//!  CRIU -> LazyReply ------------------------------>  background)
//!         <--------------------------------------- LeaseRenewal (every lease/4)
//!  LeaseRenewal ---------------------------------->  lease = request sent + lease
//!         <--------------------------------------- PagesComplete
//!  Commit (as for stop-copy) --------------------->
//! ```
//!
//! The promise: until the destination holds every page, the source stays
//! frozen with its memory intact. A failure after the copy was let run
//! ([`SourceLease`]) thaws the source only once the destination said it
//! removed its copy, or once its lease has surely run out; what the copy
//! did meanwhile is lost (`fallback_after_run_ms` in the result).

use super::*;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use criu_bindings::lazy::{self, DaemonRequest, PageReply};
use migration_protocol::{PagesComplete, RunOnLease, LEASE_MARGIN_MS};

/// How long a source waits, after its last grant of a `lease_ms` lease,
/// before it may thaw.
pub(crate) fn lease_wait(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms + LEASE_MARGIN_MS)
}

/// The lazy dump serving pages: CRIU's thread and our end of its socket.
pub(super) struct LazySource {
    worker: std::thread::JoinHandle<Result<u64, criu_bindings::CriuError>>,
    socket: UnixStream,
}

impl LazySource {
    /// Ends CRIU's page serving (its next read sees the end) and waits for
    /// it: CRIU puts the freezer back as it found it when it ends, so it
    /// must be done before a thaw.
    pub(super) fn end(self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let _ = self.worker.join();
    }
}

/// The source's side of the destination's lease (see
/// `migration_protocol::RunOnLease`): when it granted it, and whether the
/// destination said its copy is gone.
pub(super) struct SourceLease {
    pub duration: Duration,
    first_grant: Option<Instant>,
    last_grant: Option<Instant>,
    /// The destination said (Abort or Error) it removed its copy.
    pub destination_removed: bool,
    /// Set by a fallback: how long the destination's copy had run.
    pub fallback_after_run: Option<Duration>,
}

impl SourceLease {
    pub fn new(duration: Duration) -> Self {
        Self { duration, first_grant: None, last_grant: None, destination_removed: false, fallback_after_run: None }
    }

    fn granted(&mut self) {
        let now = Instant::now();
        self.first_grant.get_or_insert(now);
        self.last_grant = Some(now);
    }

    /// From the freeze to the copy being let run, once it was.
    pub fn granted_after(&self, frozen_at: Instant) -> Option<Duration> {
        self.first_grant.map(|g| g.saturating_duration_since(frozen_at))
    }

    /// The earliest moment the source may thaw without word from the
    /// destination.
    fn thaw_not_before(&self) -> Option<Instant> {
        self.last_grant.map(|g| g + lease_wait(self.duration.as_millis() as u64))
    }
}

impl<'a> Migration<'a> {
    /// CRIU's lazy dump: its images are streamed until its post-dump
    /// notification (they are complete then); it goes on serving pages.
    pub(super) fn lazy_dump_and_stream(&mut self, mut dump: DumpOptions) -> Result<images::RoundBytes, MigrationError> {
        let images_dir = dump.images_dir.clone();
        let log = self.work_dir.join(&dump.log_file);
        dump.lazy_pages = true;
        let (ours, theirs) = criu_bindings::page_server_socketpair(RELAY_SOCKET_BUFFER)
            .map_err(|e| MigrationError::Other(format!("creating CRIU's page-server socket: {e}")))?;
        let (told, post_dump) = std::sync::mpsc::channel();
        let started = Instant::now();
        let CriuRun { pid, worker } = self.host.start_dump(dump, Some(theirs), Some(told))?;
        if let (Some(g), Some(pid)) = (self.guard.as_mut(), pid) {
            g.watch_criu(pid);
        }
        let lazy = LazySource { worker, socket: UnixStream::from(ours) };
        let mut streamer = images::ImageStreamer::new(&images_dir);
        let mut streamed = 0u64;
        let streaming = (|| -> Result<(), MigrationError> {
            loop {
                if post_dump.try_recv().is_ok() {
                    return Ok(());
                }
                if lazy.worker.is_finished() {
                    return Err(MigrationError::Other("CRIU's lazy dump ended before its images were complete".into()));
                }
                match streamer.pump(&mut self.p.peer.writer, &mut self.compressor)? {
                    0 => std::thread::sleep(Duration::from_millis(2)),
                    n => {
                        streamed += n;
                        self.rep.progress(Phase::Dump, streamed, started);
                    }
                }
            }
        })();
        if let Err(e) = streaming {
            lazy.end();
            let detail = container_runtime::runc::criu_log_errors(&log).map(|d| format!(": {d}")).unwrap_or_default();
            return Err(MigrationError::Other(format!("{e}{detail}")));
        }
        let dump_ms = started.elapsed().as_millis() as u64;
        self.lazy = Some(lazy);
        self.rep.phase(Phase::Transfer);
        failpoint!("sender-after-dump")?;
        streamer.finish(&mut self.p.peer.writer, &mut self.compressor, dump_ms)
    }

    /// After the images: the destination's Ready, the run on a lease, and
    /// every page it asks for, until it says it holds them all and CRIU's
    /// lazy dump ended well. Returns the destination's restore time.
    pub(super) fn serve_postcopy(&mut self, result: &mut ResultEvent) -> Result<u64, MigrationError> {
        let (criu_read, criu_write) = {
            let lazy = self.lazy.as_ref().expect("the lazy dump runs");
            let clone = || lazy.socket.try_clone().map_err(MigrationError::io("CRIU's page-server socket"));
            (clone()?, clone()?)
        };
        let Some(conn_socket) = self.p.peer.control.socket.as_ref().map(|s| s.try_clone()).transpose().map_err(MigrationError::io("socket"))? else {
            return Err(MigrationError::Usage("post-copy needs a tcp:// destination".into()));
        };
        // Requests go to CRIU from a thread of their own: CRIU answers
        // one before it reads the next, and its answers are read here.
        let (requests, to_criu) = std::sync::mpsc::channel::<[u8; lazy::HEADER_LEN]>();
        let writer = std::thread::spawn(move || {
            let mut criu_write = criu_write;
            for raw in to_criu {
                if criu_write.write_all(&raw).is_err() {
                    break;
                }
            }
        });
        let served = self.relay_lazy_pages(result, &conn_socket, criu_read, &requests);
        drop(requests);
        let _ = writer.join();
        // What CRIU said of a failure on its side.
        let served = served.map_err(|e| match &e {
            MigrationError::Io { .. } | MigrationError::Other(_) => {
                let log = self.work_dir.join(format!("{}.log", round_dir(RoundKind::Final, 0)));
                match container_runtime::runc::criu_log_errors(&log) {
                    Some(detail) => MigrationError::Other(format!("{e}; CRIU: {detail}")),
                    None => e,
                }
            }
            _ => e,
        });
        let restore_ms = served?;
        // CRIU's dump ends once the daemon's close went through.
        let lazy = self.lazy.take().expect("the lazy dump runs");
        match lazy.worker.join() {
            Ok(Ok(_)) => Ok(restore_ms),
            Ok(Err(e)) => Err(MigrationError::Other(format!("CRIU's lazy dump failed after every page was sent ({e})"))),
            Err(_) => Err(MigrationError::Other("the CRIU thread panicked".into())),
        }
    }

    fn relay_lazy_pages(
        &mut self,
        result: &mut ResultEvent,
        conn_socket: &std::net::TcpStream,
        mut criu: UnixStream,
        requests: &std::sync::mpsc::Sender<[u8; lazy::HEADER_LEN]>,
    ) -> Result<u64, MigrationError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut outstanding: VecDeque<(u64, u64, u64)> = VecDeque::new();
        let mut close_forwarded = false;
        let mut criu_closed = false;
        let mut complete: Option<PagesComplete> = None;
        let mut restore_ms = None;
        let mut last_heard = Instant::now();
        let bad = |why: String| MigrationError::BadStream(format!("post-copy: {why}"));
        loop {
            if complete.is_some() && criu_closed {
                break;
            }
            let (conn_ready, criu_ready) = if self.p.peer.control.has_buffered() {
                (true, false)
            } else {
                let mut fds = [PollFd::new(conn_socket.as_fd(), PollFlags::POLLIN), PollFd::new(criu.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(200u16)).map_err(|e| MigrationError::Other(format!("poll: {e}")))?;
                let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
                // Once closed, CRIU's socket only reads end of file.
                (ready(&fds[0]), ready(&fds[1]) && !criu_closed)
            };
            // Silence: the destination restores (Ready may take the
            // restore's time), then asks for renewals every lease/4: a
            // lease's time without a word means it is gone or cut off.
            let limit = match (restore_ms, self.lease.last_grant) {
                (None, _) => self.opts.restore_timeout,
                (Some(_), Some(_)) => self.lease.duration,
                (Some(_), None) => self.opts.io_timeout,
            };
            if !conn_ready && !criu_ready && last_heard.elapsed() > limit {
                return Err(MigrationError::Other(format!("post-copy: nothing came from the destination for {} s", limit.as_secs())));
            }
            if conn_ready {
                let frame = match self.p.peer.read_with_timeout(self.opts.io_timeout) {
                    Ok(f) => f,
                    Err(e) => {
                        // An Error from the destination comes after it
                        // removed its copy.
                        if matches!(e, MigrationError::Remote(_)) {
                            self.lease.destination_removed = true;
                        }
                        return Err(e);
                    }
                };
                last_heard = Instant::now();
                match frame.kind {
                    MessageKind::LazyRequest => {
                        let raw: [u8; lazy::HEADER_LEN] = frame.payload.as_slice().try_into().map_err(|_| bad(format!("a page request of {} bytes", frame.payload.len())))?;
                        match DaemonRequest::parse(&raw).map_err(|e| bad(e.to_string()))? {
                            DaemonRequest::Get { pid, vaddr, nr_pages } => outstanding.push_back((pid, vaddr, nr_pages)),
                            DaemonRequest::Close { .. } => close_forwarded = true,
                        }
                        requests.send(raw).map_err(|_| MigrationError::Other("CRIU's page server stopped taking requests".into()))?;
                    }
                    MessageKind::Ready => {
                        let ready: Ready = frame.json()?;
                        restore_ms = Some(ready.restore_ms);
                        self.step(SourceEvent::Ready)?;
                        self.run_on_lease()?;
                    }
                    MessageKind::LeaseRenewal if restore_ms.is_some() => {
                        self.p.peer.writer.write_frame(MessageKind::LeaseRenewal, &frame.payload)?;
                        self.p.peer.flush()?;
                        self.lease.granted();
                    }
                    MessageKind::PagesComplete => complete = Some(frame.json()?),
                    MessageKind::Abort => {
                        let abort: migration_protocol::Abort = frame.json()?;
                        self.lease.destination_removed = true;
                        return Err(MigrationError::Remote(abort.reason));
                    }
                    other => return Err(bad(format!("a {other:?} message"))),
                }
            }
            if criu_ready {
                if close_forwarded && outstanding.is_empty() {
                    let mut status = [0u8; 4];
                    criu.read_exact(&mut status).map_err(MigrationError::io("reading CRIU's page-server close"))?;
                    self.p.peer.writer.write_frame(MessageKind::LazyReply, &status)?;
                    self.p.peer.flush()?;
                    criu_closed = true;
                    continue;
                }
                let header = lazy::read_header(&mut criu)
                    .map_err(MigrationError::io("reading CRIU's page server"))?
                    .ok_or_else(|| MigrationError::Other("CRIU's page server closed its socket before every page was sent".into()))?;
                let asked = outstanding.pop_front().ok_or_else(|| MigrationError::Other("CRIU's page server answered a request never made".into()))?;
                let reply = PageReply::parse(&header, asked).map_err(|e| MigrationError::Other(format!("CRIU's page server sent {e}")))?;
                let mut payload = vec![0u8; lazy::HEADER_LEN + reply.data_len() as usize];
                payload[..lazy::HEADER_LEN].copy_from_slice(&header);
                criu.read_exact(&mut payload[lazy::HEADER_LEN..]).map_err(MigrationError::io("reading pages from CRIU's page server"))?;
                self.p.peer.writer.write_frame(MessageKind::LazyReply, &payload)?;
                self.p.peer.flush()?;
            }
        }
        let complete = complete.expect("the loop ends with it");
        result.postcopy = Some(crate::events::PostcopyReport {
            lease_ms: self.lease.duration.as_millis() as u64,
            faults: complete.faults,
            pages: complete.pages,
            background_pages: complete.background_pages,
            all_pages_after_run_ms: complete.after_run_ms,
        });
        restore_ms.ok_or_else(|| bad("every page arrived before the destination restored".into()))
    }

    /// Lets the destination run its copy: journalled first (a process
    /// settling this migration must wait for the lease before it thaws).
    fn run_on_lease(&mut self) -> Result<(), MigrationError> {
        self.step(SourceEvent::PostcopyStarted)?;
        let lease_ms = self.lease.duration.as_millis() as u64;
        if let Some(g) = self.guard.as_mut() {
            g.lease(lease_ms);
        }
        failpoint!("sender-before-run-on-lease")?;
        self.p.peer.writer.write_json(MessageKind::RunOnLease, &RunOnLease { lease_ms })?;
        self.p.peer.flush()?;
        // Taken after the write: a later grant only makes the wait longer.
        self.lease.granted();
        self.rep.warn(format!("post-copy: the destination runs the container on a {lease_ms} ms lease while its memory follows"));
        failpoint!("sender-after-run-on-lease")?;
        Ok(())
    }

    /// A failure after the destination's copy was let run: the lazy dump
    /// ends, the destination is told, and the source thaws once the
    /// destination said its copy is gone or its lease has surely run out.
    pub(super) fn rollback_after_lease(&mut self, error: MigrationError) -> Failure {
        self.rep.phase(Phase::Rollback);
        if let Some(lazy) = self.lazy.take() {
            lazy.end();
        }
        self.tell_receiver_abort(&error);
        if let Some(deadline) = self.lease.thaw_not_before() {
            while !self.lease.destination_removed {
                let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
                match self.p.peer.read_with_timeout(left) {
                    Ok(f) if f.kind == MessageKind::Abort => self.lease.destination_removed = true,
                    Ok(_) => {}
                    Err(MigrationError::Remote(_)) => self.lease.destination_removed = true,
                    Err(_) => {
                        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                        break;
                    }
                }
            }
            self.lease.fallback_after_run = self.lease.first_grant.map(|g| g.elapsed());
            let how = if self.lease.destination_removed { "the destination removed its copy" } else { "the destination's lease ran out" };
            self.rep.warn(format!("post-copy fell back: {how}; the source resumes from the moment it froze"));
        }
        self.rollback(error)
    }
}
