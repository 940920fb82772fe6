//! Post-copy's page traffic: CRIU's lazy-pages daemon (on the destination)
//! asks a lazy dump's page server (on the source) for the pages its
//! restored tasks lack, and ctmigrate carries each question and answer
//! over its own authenticated connection. This module knows the two ends'
//! wire format, checks it (what comes from the other host is hostile until
//! checked), and starts the daemon.
//!
//! ```text
//!   destination                                          source
//!   restored tasks --uffd--> criu lazy-pages            criu swrk (lazy dump)
//!                                |  ^                      ^   |
//!                    GET (32 B)  v  | header + pages   GET |   v header + pages
//!                            ctmigrate receiver ==TLS== ctmigrate sender
//! ```
//!
//! Wire facts (CRIU's criu/page-xfer.c and uffd.c): every message starts
//! with the 32-byte `page_server_iov` (host byte order): `u32 cmd`, 4 bytes
//! of padding, `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`. The daemon sends
//! only `GET` (7): `dst_id` is the task's pid as in the images, `vaddr` is
//! page aligned, at most [`MAX_REQUEST_PAGES`]; and at its end `CLOSE`
//! (0x1023) or `FORCE_CLOSE` (0x1024). The page server answers each GET, in
//! order, with a header whose `cmd` is `ADD_F | PE_PRESENT << 16`, the same
//! `vaddr` and `dst_id`, `nr_pages` at most the request's, then that many
//! pages; a CLOSE gets an `i32` status (0: fine).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HEADER_LEN: usize = 32;
pub const PAGE_SIZE: u64 = 4096;
/// The daemon's largest request (4 MiB, uffd.c's MAX_XFER_LEN); a larger
/// one is refused.
pub const MAX_REQUEST_PAGES: u64 = 1024;

const PS_IOV_GET: u32 = 7;
const PS_IOV_ADD_F: u32 = 6;
const PE_PRESENT: u32 = 1 << 2;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// The reply header's command.
const REPLY_CMD: u32 = PS_IOV_ADD_F | (PE_PRESENT << 16);
/// Highest user-space address on x86_64 (47 bits).
const USER_ADDRESS_END: u64 = 1 << 47;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LazyError {
    #[error("unknown lazy-pages command {0:#x}")]
    UnknownCommand(u32),
    #[error("a request for {0} pages (at most {MAX_REQUEST_PAGES})")]
    TooManyPages(u64),
    #[error("a request for pages at {0:#x}, not a page-aligned user address")]
    BadAddress(u64),
    #[error("a request for pid {0}, which is not a pid")]
    BadPid(u64),
    #[error("a reply with command {0:#x}, not pages")]
    NotPages(u32),
    #[error("a reply for {got_pid}/{got_vaddr:#x}, the request was for {want_pid}/{want_vaddr:#x}")]
    OutOfOrder { got_pid: u64, got_vaddr: u64, want_pid: u64, want_vaddr: u64 },
    #[error("a reply of {got} pages to a request for {asked}")]
    MorePagesThanAsked { got: u64, asked: u64 },
}

/// One request of the lazy-pages daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonRequest {
    /// Pages `vaddr..vaddr + nr_pages * 4096` of task `pid`.
    Get { pid: u64, vaddr: u64, nr_pages: u64 },
    /// Every page arrived; the daemon ends (`force`: it used an inherited
    /// socket).
    Close { force: bool },
}

fn u64_at(raw: &[u8; HEADER_LEN], at: usize) -> u64 {
    u64::from_ne_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
}

fn encode(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; HEADER_LEN] {
    let mut r = [0u8; HEADER_LEN];
    r[0..4].copy_from_slice(&cmd.to_ne_bytes());
    for (at, v) in [(8, nr_pages), (16, vaddr), (24, dst_id)] {
        r[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    r
}

impl DaemonRequest {
    /// Parses and checks one request header.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Result<Self, LazyError> {
        let cmd = u32::from_ne_bytes(raw[0..4].try_into().expect("4 bytes"));
        match cmd {
            PS_IOV_GET => {
                let (nr_pages, vaddr, pid) = (u64_at(raw, 8), u64_at(raw, 16), u64_at(raw, 24));
                Self::get(pid, vaddr, nr_pages)
            }
            PS_IOV_CLOSE => Ok(DaemonRequest::Close { force: false }),
            PS_IOV_FORCE_CLOSE => Ok(DaemonRequest::Close { force: true }),
            other => Err(LazyError::UnknownCommand(other)),
        }
    }

    /// A GET, checked: what a page server would choke on never reaches it.
    pub fn get(pid: u64, vaddr: u64, nr_pages: u64) -> Result<Self, LazyError> {
        if nr_pages == 0 || nr_pages > MAX_REQUEST_PAGES {
            return Err(LazyError::TooManyPages(nr_pages));
        }
        if !vaddr.is_multiple_of(PAGE_SIZE) || vaddr >= USER_ADDRESS_END || vaddr + nr_pages * PAGE_SIZE > USER_ADDRESS_END {
            return Err(LazyError::BadAddress(vaddr));
        }
        // Linux pids are at most 2^22.
        if pid == 0 || pid > (1 << 22) {
            return Err(LazyError::BadPid(pid));
        }
        Ok(DaemonRequest::Get { pid, vaddr, nr_pages })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        match *self {
            DaemonRequest::Get { pid, vaddr, nr_pages } => encode(PS_IOV_GET, nr_pages, vaddr, pid),
            DaemonRequest::Close { force: false } => encode(PS_IOV_CLOSE, 0, 0, 0),
            DaemonRequest::Close { force: true } => encode(PS_IOV_FORCE_CLOSE, 0, 0, 0),
        }
    }
}

/// The header of a page server's answer to a GET; `nr_pages` pages follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageReply {
    pub pid: u64,
    pub vaddr: u64,
    pub nr_pages: u64,
}

impl PageReply {
    /// Parses a reply and checks it answers `asked` (the oldest GET not
    /// answered yet).
    pub fn parse(raw: &[u8; HEADER_LEN], asked: (u64, u64, u64)) -> Result<Self, LazyError> {
        let cmd = u32::from_ne_bytes(raw[0..4].try_into().expect("4 bytes"));
        if cmd != REPLY_CMD {
            return Err(LazyError::NotPages(cmd));
        }
        let reply = PageReply { nr_pages: u64_at(raw, 8), vaddr: u64_at(raw, 16), pid: u64_at(raw, 24) };
        reply.answers(asked)?;
        Ok(reply)
    }

    /// Checks this reply answers the GET `(pid, vaddr, nr_pages)`.
    pub fn answers(&self, (pid, vaddr, nr_pages): (u64, u64, u64)) -> Result<(), LazyError> {
        if self.pid != pid || self.vaddr != vaddr {
            return Err(LazyError::OutOfOrder { got_pid: self.pid, got_vaddr: self.vaddr, want_pid: pid, want_vaddr: vaddr });
        }
        if self.nr_pages == 0 || self.nr_pages > nr_pages {
            return Err(LazyError::MorePagesThanAsked { got: self.nr_pages, asked: nr_pages });
        }
        Ok(())
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        encode(REPLY_CMD, self.nr_pages, self.vaddr, self.pid)
    }

    pub fn data_len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }
}

/// Reads one 32-byte header; None at a clean end of stream.
pub fn read_header<R: Read>(r: &mut R) -> std::io::Result<Option<[u8; HEADER_LEN]>> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a lazy-pages header cut short")),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(raw))
}

/// Writes a CLOSE's status.
pub fn write_close_status<W: Write>(w: &mut W, status: i32) -> std::io::Result<()> {
    w.write_all(&status.to_ne_bytes())
}

/// Where the daemon's descriptors are placed in it.
const DAEMON_PS_SOCKET_FD: i32 = 3;

/// `criu lazy-pages` on the destination: it takes the restored tasks'
/// userfaultfds from the restore (through `lazy-pages.socket` in the work
/// directory) and asks for their pages over the socket it is given.
pub struct LazyPagesDaemon {
    child: Child,
    work_dir: PathBuf,
    log: PathBuf,
}

impl LazyPagesDaemon {
    /// Starts the daemon on `images` with its page-server connection
    /// `socket`; its log goes to `work_dir/log_name`. Call
    /// [`Self::wait_listening`] before starting the restore.
    pub fn start(binary: &Path, images: &Path, work_dir: &Path, log_name: &str, socket: OwnedFd) -> std::io::Result<Self> {
        let mut cmd = Command::new(binary);
        cmd.arg("lazy-pages")
            .arg("--page-server")
            .arg("--ps-socket")
            .arg(DAEMON_PS_SOCKET_FD.to_string())
            .arg("-D")
            .arg(images)
            .arg("-W")
            .arg(work_dir)
            .arg("-o")
            .arg(log_name)
            .arg("-v4")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        crate::sys::map_fds_in_child(&mut cmd, vec![(DAEMON_PS_SOCKET_FD, socket)]);
        let child = cmd.spawn()?;
        Ok(Self { child, work_dir: work_dir.to_path_buf(), log: work_dir.join(log_name) })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the daemon listens for the restore, or fails saying why.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let socket = self.work_dir.join("lazy-pages.socket");
        let deadline = Instant::now() + timeout;
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("criu lazy-pages exited ({status}) before it listened{}", self.log_errors()));
            }
            if Instant::now() > deadline {
                return Err(format!("criu lazy-pages did not listen within {} s{}", timeout.as_secs(), self.log_errors()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Exit status once ended (None while it runs).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Page faults the daemon served (its log's `#PF at` lines).
    pub fn faults_served(&self) -> u64 {
        std::fs::read_to_string(&self.log).map(|t| t.lines().filter(|l| l.contains("#PF at")).count() as u64).unwrap_or(0)
    }

    /// The error lines of the daemon's log, for a failure's message.
    pub fn log_errors(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error") || l.contains("error")).take(3).collect();
        if errors.is_empty() {
            String::new()
        } else {
            format!(": {}", errors.join("; "))
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for LazyPagesDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_round_trips_and_a_close_is_known() {
        let get = DaemonRequest::Get { pid: 42, vaddr: 0x7f00_0000_0000, nr_pages: 16 };
        assert_eq!(DaemonRequest::parse(&get.encode()), Ok(get));
        for force in [false, true] {
            let close = DaemonRequest::Close { force };
            assert_eq!(DaemonRequest::parse(&close.encode()), Ok(close));
        }
    }

    #[test]
    fn requests_a_page_server_would_choke_on_are_refused() {
        let raw = |cmd: u32, n: u64, v: u64, pid: u64| encode(cmd, n, v, pid);
        assert_eq!(DaemonRequest::parse(&raw(1, 1, 0x1000, 1)), Err(LazyError::UnknownCommand(1)));
        assert_eq!(DaemonRequest::parse(&raw(PS_IOV_GET, 0, 0x1000, 1)), Err(LazyError::TooManyPages(0)));
        assert_eq!(DaemonRequest::parse(&raw(PS_IOV_GET, 1025, 0x1000, 1)), Err(LazyError::TooManyPages(1025)));
        assert_eq!(DaemonRequest::parse(&raw(PS_IOV_GET, 1, 0x1001, 1)), Err(LazyError::BadAddress(0x1001)));
        assert_eq!(DaemonRequest::parse(&raw(PS_IOV_GET, 2, USER_ADDRESS_END - 4096, 1)), Err(LazyError::BadAddress(USER_ADDRESS_END - 4096)));
        assert_eq!(DaemonRequest::parse(&raw(PS_IOV_GET, 1, 0x1000, 0)), Err(LazyError::BadPid(0)));
        assert_eq!(DaemonRequest::parse(&raw(PS_IOV_GET, 1, 0x1000, 1 << 40)), Err(LazyError::BadPid(1 << 40)));
    }

    #[test]
    fn a_reply_must_answer_the_oldest_request_with_no_more_than_it_asked() {
        let asked = (7, 0x10000, 16);
        let ok = PageReply { pid: 7, vaddr: 0x10000, nr_pages: 4 };
        assert_eq!(PageReply::parse(&ok.encode(), asked), Ok(ok));
        assert_eq!(ok.data_len(), 4 * 4096);
        let more = PageReply { nr_pages: 17, ..ok };
        assert_eq!(PageReply::parse(&more.encode(), asked), Err(LazyError::MorePagesThanAsked { got: 17, asked: 16 }));
        let other = PageReply { vaddr: 0x20000, ..ok };
        assert!(matches!(PageReply::parse(&other.encode(), asked), Err(LazyError::OutOfOrder { .. })));
        assert_eq!(PageReply::parse(&encode(PS_IOV_GET, 4, 0x10000, 7), asked), Err(LazyError::NotPages(PS_IOV_GET)));
    }

    #[test]
    fn a_header_cut_short_is_an_error_and_none_is_the_end() {
        assert!(read_header(&mut &[][..]).unwrap().is_none());
        assert!(read_header(&mut &[0u8; 10][..]).is_err());
        assert!(read_header(&mut &[0u8; 32][..]).unwrap().is_some());
    }
}
