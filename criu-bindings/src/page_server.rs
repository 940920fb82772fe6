//! The server side of CRIU's page-server protocol, so that a dump's memory
//! pages come to us over a socket instead of through image files.
//!
//! With `criu_opts.ps.fd` set (allowed only to `criu swrk`), CRIU's dump
//! writes no `pagemap-*.img` or `pages-*.img` of its own: it sends each
//! pagemap's runs over that socket, splicing the pages straight from the
//! dumped tasks' memory. Whoever reads the socket makes the images.
//!
//! Protocol facts (CRIU's criu/page-xfer.c): every request is a 32-byte
//! `page_server_iov` in host byte order: `u32 cmd` (low 16 bits the
//! command, high 16 bits the pagemap flags of an ADD_F), 4 bytes of
//! padding, `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`. `dst_id` names the
//! pagemap: low 8 bits its kind (1 a task's `pagemap-<id>.img`, 2 a shared
//! memory object's `pagemap-shmem-<id>.img`), the rest its id. Answers:
//! OPEN2 gets one byte (1 if a parent image exists), PARENT an `int` (the
//! same), CLOSE and FORCE_CLOSE an `int32` status (0: all received). An
//! ADD_F whose flags have PE_PRESENT is followed by `nr_pages` pages.

use std::io::{Read, Write};

/// One request from CRIU, after its answer (if any) went back.
#[derive(Debug, PartialEq, Eq)]
pub enum PageServerRequest {
    /// Following runs belong to the pagemap image `pagemap_name`.
    Open { pagemap_name: String },
    /// A run of `nr_pages` pages at `vaddr` with pagemap `flags`; when
    /// `flags` has [`crate::pagemap::FLAG_PRESENT`] their bytes follow on
    /// the socket: read exactly `nr_pages * 4096` of them with
    /// [`PageServerConn::data`] before the next request.
    Add { vaddr: u64, nr_pages: u64, flags: u32 },
    /// The dump sent everything; the status has been answered.
    Close,
}

#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("CRIU's page-server socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("CRIU closed its page-server socket before the dump finished")]
    Closed,
    #[error("CRIU sent an unknown page-server request (command {0:#x})")]
    UnknownCommand(u32),
    #[error("CRIU sent a page-server request for an unknown kind of pagemap ({0:#x})")]
    UnknownPagemap(u64),
    #[error("CRIU sent pages before naming their pagemap")]
    NotOpen,
    #[error("CRIU sent a run of {0} pages, more than any address space holds")]
    TooLarge(u64),
}

const PS_IOV_ADD: u32 = 1;
const PS_IOV_HOLE: u32 = 2;
const PS_IOV_OPEN: u32 = 3;
const PS_IOV_OPEN2: u32 = 4;
const PS_IOV_PARENT: u32 = 5;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
/// Pagemap flags for the older ADD (present) and HOLE (in the parent).
const PE_PARENT: u32 = 1 << 0;
const PE_PRESENT: u32 = 1 << 2;

const REQUEST_LEN: usize = 32;
/// 2^52 pages is 2^64 bytes: no run is longer.
const MAX_RUN_PAGES: u64 = 1 << 52;

/// Answers to CRIU as a page server with no parent images (a dump that is
/// not incremental) over `S`, its end of the socket.
pub struct PageServerConn<S> {
    socket: S,
    /// The pagemap runs go to, once CRIU opened one.
    open: Option<u64>,
}

impl<S: Read + Write> PageServerConn<S> {
    pub fn new(socket: S) -> Self {
        Self { socket, open: None }
    }

    /// The next request, answering it first when CRIU waits for an answer.
    pub fn next_request(&mut self) -> Result<PageServerRequest, PageServerError> {
        let mut raw = [0u8; REQUEST_LEN];
        if let Err(e) = self.socket.read_exact(&mut raw) {
            return Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof => PageServerError::Closed,
                _ => PageServerError::Io(e),
            });
        }
        let u64_at = |at: usize| u64::from_ne_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let cmd = u32::from_ne_bytes(raw[0..4].try_into().expect("4 bytes"));
        let (nr_pages, vaddr, dst_id) = (u64_at(8), u64_at(16), u64_at(24));
        let flags = cmd >> 16;
        let add = |this: &Self, flags: u32| {
            if this.open != Some(dst_id) {
                return Err(PageServerError::NotOpen);
            }
            if nr_pages > MAX_RUN_PAGES {
                return Err(PageServerError::TooLarge(nr_pages));
            }
            Ok(PageServerRequest::Add { vaddr, nr_pages, flags })
        };
        let command = cmd & 0xffff;
        match command {
            PS_IOV_OPEN | PS_IOV_OPEN2 => {
                let pagemap_name = pagemap_name(dst_id)?;
                self.open = Some(dst_id);
                if command == PS_IOV_OPEN2 {
                    // No parent: every page is sent.
                    self.socket.write_all(&[0u8])?;
                }
                Ok(PageServerRequest::Open { pagemap_name })
            }
            PS_IOV_PARENT => {
                pagemap_name(dst_id)?;
                self.socket.write_all(&0i32.to_ne_bytes())?;
                self.next_request()
            }
            PS_IOV_ADD_F => add(self, flags),
            PS_IOV_ADD => add(self, PE_PRESENT),
            PS_IOV_HOLE => add(self, PE_PARENT),
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                self.socket.write_all(&0i32.to_ne_bytes())?;
                Ok(PageServerRequest::Close)
            }
            _ => Err(PageServerError::UnknownCommand(cmd)),
        }
    }

    /// The socket, to read an Add's pages from.
    pub fn data(&mut self) -> &mut S {
        &mut self.socket
    }
}

/// The pagemap image a `dst_id` names.
fn pagemap_name(dst_id: u64) -> Result<String, PageServerError> {
    let id = dst_id >> 8;
    match dst_id & 0xff {
        1 => Ok(format!("pagemap-{id}.img")),
        2 => Ok(format!("pagemap-shmem-{id}.img")),
        _ => Err(PageServerError::UnknownPagemap(dst_id)),
    }
}

/// One request as CRIU writes it.
fn encode_request(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; REQUEST_LEN] {
    let mut r = [0u8; REQUEST_LEN];
    r[0..4].copy_from_slice(&cmd.to_ne_bytes());
    for (at, v) in [(8, nr_pages), (16, vaddr), (24, dst_id)] {
        r[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    r
}

/// CRIU's side of the conversation, for fakes of CRIU in tests (a dump
/// sending a task's pages); ctmigrate itself only serves.
pub struct PageServerClient<S> {
    socket: S,
    dst_id: u64,
}

impl<S: Read + Write> PageServerClient<S> {
    pub fn new(socket: S) -> Self {
        Self { socket, dst_id: 0 }
    }

    /// Opens task `id`'s pagemap (`pagemap-<id>.img`).
    pub fn open_task(&mut self, id: u64) -> std::io::Result<()> {
        self.dst_id = (id << 8) | 1;
        self.socket.write_all(&encode_request(PS_IOV_OPEN2, 0, 0, self.dst_id))?;
        let mut has_parent = [0u8];
        self.socket.read_exact(&mut has_parent)
    }

    /// Sends present pages at `vaddr` (`pages`, a whole number of 4 KiB).
    pub fn send_pages(&mut self, vaddr: u64, pages: &[u8]) -> std::io::Result<()> {
        let cmd = PS_IOV_ADD_F | (PE_PRESENT << 16);
        self.socket.write_all(&encode_request(cmd, pages.len() as u64 / 4096, vaddr, self.dst_id))?;
        self.socket.write_all(pages)
    }

    /// Ends the dump's pages; returns the server's status (0: all taken).
    pub fn close(mut self) -> std::io::Result<i32> {
        self.socket.write_all(&encode_request(PS_IOV_CLOSE, 0, 0, 0))?;
        let mut status = [0u8; 4];
        self.socket.read_exact(&mut status)?;
        Ok(i32::from_ne_bytes(status))
    }
}

/// Pages-file ids for relayed pagemaps start here, as CRIU's own page
/// server does, clear of the ids a dump gives files it writes itself.
pub const RELAYED_PAGES_ID_BASE: u32 = 0x10000;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A fake CRIU side: its requests in, our answers out.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        answers: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.answers.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn request(cmd: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> Vec<u8> {
        encode_request(cmd, nr_pages, vaddr, dst_id).to_vec()
    }

    fn conn(requests: &[Vec<u8>]) -> PageServerConn<Duplex> {
        PageServerConn::new(Duplex { input: Cursor::new(requests.concat()), answers: Vec::new() })
    }

    #[test]
    fn a_dump_conversation() {
        let task = (42 << 8) | 1;
        let shmem = (7 << 8) | 2;
        let mut pages = vec![0xabu8; 4096];
        let mut c = conn(&[
            request(PS_IOV_OPEN2, 0, 0, task),
            request(PS_IOV_ADD_F | (PE_PRESENT << 16), 1, 0x1000, task),
            pages.clone(),
            request(PS_IOV_PARENT, 0, 0, shmem),
            request(PS_IOV_OPEN2, 0, 0, shmem),
            request(PS_IOV_HOLE, 3, 0x8000, shmem),
            request(PS_IOV_FORCE_CLOSE, 0, 0, 0),
        ]);
        assert_eq!(c.next_request().unwrap(), PageServerRequest::Open { pagemap_name: "pagemap-42.img".into() });
        assert_eq!(c.next_request().unwrap(), PageServerRequest::Add { vaddr: 0x1000, nr_pages: 1, flags: PE_PRESENT });
        pages.fill(0);
        c.data().read_exact(&mut pages).unwrap();
        assert!(pages.iter().all(|&b| b == 0xab), "the run's bytes follow its request");
        // PARENT is answered (no parent) and passed over.
        assert_eq!(c.next_request().unwrap(), PageServerRequest::Open { pagemap_name: "pagemap-shmem-7.img".into() });
        assert_eq!(c.next_request().unwrap(), PageServerRequest::Add { vaddr: 0x8000, nr_pages: 3, flags: PE_PARENT });
        assert_eq!(c.next_request().unwrap(), PageServerRequest::Close);
        // Answers, in order: OPEN2's byte, PARENT's int, OPEN2's byte, the status.
        let mut expected = vec![0u8];
        expected.extend_from_slice(&0i32.to_ne_bytes());
        expected.push(0);
        expected.extend_from_slice(&0i32.to_ne_bytes());
        assert_eq!(c.socket.answers, expected);
        assert!(matches!(c.next_request(), Err(PageServerError::Closed)));
    }

    #[test]
    fn malformed_requests_are_refused() {
        let task = (1 << 8) | 1;
        let err = |reqs: &[Vec<u8>]| {
            let mut c = conn(reqs);
            loop {
                match c.next_request() {
                    Ok(_) => continue,
                    Err(e) => return e,
                }
            }
        };
        assert!(matches!(err(&[request(PS_IOV_ADD_F, 1, 0, task)]), PageServerError::NotOpen));
        assert!(matches!(err(&[request(PS_IOV_OPEN2, 0, 0, (1 << 8) | 9)]), PageServerError::UnknownPagemap(_)));
        assert!(matches!(err(&[request(99, 0, 0, task)]), PageServerError::UnknownCommand(99)));
        assert!(matches!(
            err(&[request(PS_IOV_OPEN2, 0, 0, task), request(PS_IOV_ADD_F, u64::MAX, 0, task)]),
            PageServerError::TooLarge(_)
        ));
        // Runs for another pagemap than the open one.
        assert!(matches!(
            err(&[request(PS_IOV_OPEN2, 0, 0, task), request(PS_IOV_ADD_F, 1, 0, (2 << 8) | 1)]),
            PageServerError::NotOpen
        ));
        assert!(matches!(err(&[vec![0u8; 10]]), PageServerError::Closed), "a cut request");
    }

    #[test]
    fn the_client_speaks_what_the_server_reads() {
        let (criu, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        let fake_criu = std::thread::spawn(move || {
            let mut c = PageServerClient::new(criu);
            c.open_task(7).unwrap();
            c.send_pages(0x1000, &[0xcd; 8192]).unwrap();
            c.close().unwrap()
        });
        let mut server = PageServerConn::new(ours);
        assert_eq!(server.next_request().unwrap(), PageServerRequest::Open { pagemap_name: "pagemap-7.img".into() });
        assert_eq!(server.next_request().unwrap(), PageServerRequest::Add { vaddr: 0x1000, nr_pages: 2, flags: PE_PRESENT });
        let mut pages = vec![0u8; 8192];
        server.data().read_exact(&mut pages).unwrap();
        assert!(pages.iter().all(|&b| b == 0xcd));
        assert_eq!(server.next_request().unwrap(), PageServerRequest::Close);
        assert_eq!(fake_criu.join().unwrap(), 0);
    }
}
