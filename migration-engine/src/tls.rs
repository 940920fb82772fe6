//! Mutually authenticated TLS 1.3 for migration connections, and the
//! certificates for it.
//!
//! A host's TLS directory (`--tls-dir`) holds three PEM files:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the CA that signs every ctmigrate host of a cluster |
//! | `cert.pem` | this host's certificate, signed by that CA |
//! | `key.pem` | this host's private key (mode 0600) |
//!
//! The sender checks that the receiver's certificate names the host it
//! dialled (DNS name or IP address); the receiver accepts only clients whose
//! certificate the CA signed. `ctmigrate certs init` makes such a layout.

use std::io::{Read, Write};

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::MigrationError;

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const DEFAULT_TLS_DIR: &str = "/etc/ctmigrate/tls";

fn tls_err(dir: &Path, what: impl std::fmt::Display) -> MigrationError {
    MigrationError::Preflight(format!(
        "TLS set-up from {}: {what}; create certificates with `ctmigrate certs init`, or use --insecure on both sides",
        dir.display()
    ))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // AES-128-GCM first (ring's default order puts AES-256 first): the
    // handshake's X25519 and P-256 certificates give 128-bit security
    // whatever the cipher, and AES-128's 10 rounds to AES-256's 14 cut the
    // pipeline's CPU by about a tenth on each side (docs/performance-history.md).
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn read_certs(dir: &Path, file: &str) -> Result<Vec<CertificateDer<'static>>, MigrationError> {
    let path = dir.join(file);
    let pem = std::fs::read(&path).map_err(|e| tls_err(dir, format!("{}: {e}", path.display())))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut &pem[..]).collect();
    let certs = certs.map_err(|e| tls_err(dir, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_err(dir, format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

fn read_key(dir: &Path) -> Result<PrivateKeyDer<'static>, MigrationError> {
    let path = dir.join(KEY_FILE);
    let pem = std::fs::read(&path).map_err(|e| tls_err(dir, format!("{}: {e}", path.display())))?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| tls_err(dir, format!("{}: {e}", path.display())))?
        .ok_or_else(|| tls_err(dir, format!("{} holds no private key", path.display())))
}

fn roots(dir: &Path) -> Result<RootCertStore, MigrationError> {
    let mut store = RootCertStore::empty();
    for c in read_certs(dir, CA_FILE)? {
        store.add(c).map_err(|e| tls_err(dir, format!("bad CA certificate: {e}")))?;
    }
    Ok(store)
}

/// The sender's side.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, MigrationError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(dir, e))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(read_certs(dir, CERT_FILE)?, read_key(dir)?)
        .map_err(|e| tls_err(dir, e))?;
    // One connection per migration: no tickets, no resumption.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The receiver's side: clients must present a certificate from the CA.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, MigrationError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
        .build()
        .map_err(|e| tls_err(dir, e))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_err(dir, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(dir, CERT_FILE)?, read_key(dir)?)
        .map_err(|e| tls_err(dir, e))?;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// How connections are secured.
#[derive(Debug, Clone)]
pub enum Security {
    Tls(PathBuf),
    /// `--insecure`: plain TCP.
    Insecure,
}

/// Socket reads on a TLS connection go into a buffer this large (plus
/// room for one whole record), where rustls decrypts the records: one
/// system call brings many records.
const READ_BUFFER: usize = 256 * 1024;
/// Largest TLS 1.3 record on the wire: header, 16 KiB of plaintext, its
/// content type, padding and tag (RFC 8446 §5.2).
const MAX_RECORD: usize = 5 + (1 << 14) + 256;

/// rustls's unbuffered connection of either side: it works in buffers we
/// own, and says in each state what it needs (more bytes from the peer,
/// bytes sent, data read) until it can carry on.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &rustls::CommonState {
        self
    }
}

/// What a [`Tls::drive`] is for.
enum Goal<'a> {
    Handshake,
    Read(&'a mut [u8]),
    Send(&'a [u8]),
    CloseNotify,
}

/// A TLS connection over a blocking socket: rustls's unbuffered API, its
/// records read into and decrypted in our buffer.
struct Tls<C> {
    sock: TcpStream,
    conn: C,
    /// The peer's bytes not yet consumed by rustls: `incoming[start..filled]`.
    incoming: Box<[u8]>,
    start: usize,
    filled: usize,
    /// Records rustls encoded or encrypted, to be sent; the first
    /// `encoded` bytes wait for rustls to say "transmit".
    outgoing: Vec<u8>,
    encoded: usize,
    /// Plaintext a read had no room for: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// The peer's close_notify arrived: nothing more will.
    peer_closed: bool,
    /// Why rustls gave up on the connection (its alert has gone out).
    failed: Option<rustls::Error>,
    peer_name: Option<String>,
    /// Fault injection: damage the next record sent.
    #[cfg(feature = "failpoints")]
    corrupt_next: bool,
}

impl<C: Unbuffered> Tls<C> {
    fn new(sock: TcpStream, conn: C) -> Self {
        Self {
            sock,
            conn,
            incoming: vec![0u8; READ_BUFFER + MAX_RECORD].into_boxed_slice(),
            start: 0,
            filled: 0,
            outgoing: Vec::new(),
            encoded: 0,
            plain: Vec::new(),
            plain_at: 0,
            peer_closed: false,
            failed: None,
            peer_name: None,
            #[cfg(feature = "failpoints")]
            corrupt_next: false,
        }
    }

    /// Runs rustls until `goal` is reached. Returns the bytes read for
    /// [`Goal::Read`] (0: the peer closed with close_notify).
    fn drive(&mut self, mut goal: Goal<'_>) -> std::io::Result<usize> {
        #[cfg(feature = "failpoints")]
        let corrupt = matches!(goal, Goal::Send(_)) && std::mem::take(&mut self.corrupt_next);
        #[cfg(not(feature = "failpoints"))]
        let corrupt = false;
        loop {
            if let Some(e) = &self.failed {
                return Err(tls_error(e.clone()));
            }
            if let Goal::Read(buf) = &mut goal {
                if self.plain_at < self.plain.len() {
                    let n = buf.len().min(self.plain.len() - self.plain_at);
                    buf[..n].copy_from_slice(&self.plain[self.plain_at..self.plain_at + n]);
                    self.plain_at += n;
                    return Ok(n);
                }
            }
            let Self { sock, conn, incoming, start, filled, outgoing, encoded, plain, plain_at, peer_closed, .. } = self;
            let status = conn.process(&mut incoming[*start..*filled]);
            // What rustls is done with: gone from the buffer before the
            // next call, whatever happens below.
            *start += status.discard;
            let mut need_input = false;
            let mut handshake_over = false;
            let mut done = None;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => return Err(self.fail(e)),
            };
            match state {
                ConnectionState::EncodeTlsData(mut data) => *encoded += encode(&mut data, outgoing, *encoded)?,
                ConnectionState::TransmitTlsData(data) => {
                    sock.write_all(&outgoing[..*encoded])?;
                    *encoded = 0;
                    data.done();
                }
                ConnectionState::BlockedHandshake => need_input = true,
                ConnectionState::ReadTraffic(mut traffic) => {
                    // Each record's plaintext goes to the reader's buffer
                    // as far as it fits; the rest waits in `plain`.
                    let mut room = match &mut goal {
                        Goal::Read(buf) => &mut buf[..],
                        _ => &mut [][..],
                    };
                    let mut got = 0;
                    while let Some(record) = traffic.next_record() {
                        let payload = record.map_err(tls_error)?.payload;
                        let n = room.len().min(payload.len());
                        room[..n].copy_from_slice(&payload[..n]);
                        room = &mut room[n..];
                        got += n;
                        if n < payload.len() {
                            if *plain_at == plain.len() {
                                plain.clear();
                                *plain_at = 0;
                            }
                            plain.extend_from_slice(&payload[n..]);
                        }
                    }
                    if got > 0 {
                        done = Some(got);
                    }
                }
                ConnectionState::WriteTraffic(mut traffic) => match &goal {
                    // (A server may send before the client's certificate is checked.)
                    Goal::Handshake => handshake_over = true,
                    Goal::Read(_) if *peer_closed => done = Some(0),
                    Goal::Read(_) => need_input = true,
                    Goal::Send(data) => {
                        let n = encrypt(outgoing, |out| traffic.encrypt(data, out))?;
                        if corrupt {
                            // The first byte after the first record's header.
                            outgoing[5] ^= 0x01;
                        }
                        sock.write_all(&outgoing[..n])?;
                        done = Some(data.len());
                    }
                    Goal::CloseNotify => {
                        let n = encrypt(outgoing, |out| traffic.queue_close_notify(out))?;
                        sock.write_all(&outgoing[..n])?;
                        done = Some(0);
                    }
                },
                ConnectionState::PeerClosed => *peer_closed = true,
                ConnectionState::Closed => match goal {
                    Goal::Send(_) => {
                        return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the TLS connection is closed"))
                    }
                    _ => done = Some(0),
                },
                _ => return Err(std::io::Error::other("TLS: unexpected state (early data)")),
            }
            if handshake_over {
                if !self.conn.common().is_handshaking() {
                    return Ok(0);
                }
                need_input = true;
            }
            if let Some(n) = done {
                return Ok(n);
            }
            if need_input {
                self.fill(matches!(goal, Goal::Handshake))?;
            }
        }
    }

    /// Reads more of the peer's bytes into `incoming`, first moving what
    /// is left of a record to the front when a whole one might not fit.
    fn fill(&mut self, handshaking: bool) -> std::io::Result<()> {
        if self.start == self.filled {
            self.start = 0;
            self.filled = 0;
        } else if self.incoming.len() - self.filled < MAX_RECORD {
            self.incoming.copy_within(self.start..self.filled, 0);
            self.filled -= self.start;
            self.start = 0;
        }
        let n = self.sock.read(&mut self.incoming[self.filled..])?;
        if n == 0 {
            let why = if handshaking {
                "the peer closed the connection"
            } else {
                "the peer closed the connection without TLS close_notify (truncated)"
            };
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, why));
        }
        self.filled += n;
        Ok(())
    }

    /// rustls gave up: its alert goes to the peer, and the connection
    /// fails from now on with `e`.
    fn fail(&mut self, e: rustls::Error) -> std::io::Error {
        self.failed = Some(e.clone());
        // Only the alert is asked for (rustls hands out what it has to
        // send before it looks at the peer's bytes again).
        if let Ok(ConnectionState::EncodeTlsData(mut alert)) = self.conn.process(&mut self.incoming[self.start..self.filled]).state {
            if let Ok(n) = encode(&mut alert, &mut self.outgoing, 0) {
                let _ = self.sock.write_all(&self.outgoing[..n]);
            }
        }
        tls_error(e)
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.drive(Goal::Read(buf))
    }
}

/// Encodes a handshake record (or alert) into `out` after its first `at`
/// bytes, growing it as needed.
fn encode<D>(data: &mut rustls::unbuffered::EncodeTlsData<'_, D>, out: &mut Vec<u8>, at: usize) -> std::io::Result<usize> {
    loop {
        match data.encode(&mut out[at..]) {
            Ok(n) => return Ok(n),
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => out.resize(at + required_size, 0),
            Err(e) => return Err(std::io::Error::other(format!("TLS: {e}"))),
        }
    }
}

/// Encrypts into `out` with `f`, growing it as needed.
fn encrypt(out: &mut Vec<u8>, mut f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>) -> std::io::Result<usize> {
    loop {
        match f(out) {
            Ok(n) => return Ok(n),
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => out.resize(required_size, 0),
            Err(e) => return Err(std::io::Error::other(format!("TLS: {e}"))),
        }
    }
}

/// A TLS connection of either side, as [`Conn`] uses it.
trait Session {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn send(&mut self, data: &[u8]) -> std::io::Result<()>;
    fn close_notify(&mut self) -> std::io::Result<()>;
    fn cipher_suite(&self) -> Option<rustls::CipherSuite>;
    fn peer_name(&self) -> Option<&str>;
    /// Bytes of the peer's already read from the socket and not yet
    /// returned (a poll on the socket would not show them).
    fn buffered(&self) -> bool;
    #[cfg(feature = "failpoints")]
    fn corrupt_next_record(&mut self);
}

impl<C: Unbuffered> Session for Tls<C> {
    fn buffered(&self) -> bool {
        self.plain_at < self.plain.len() || self.start < self.filled
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Tls::read(self, buf)
    }
    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !data.is_empty() {
            self.drive(Goal::Send(data))?;
        }
        Ok(())
    }
    fn close_notify(&mut self) -> std::io::Result<()> {
        self.drive(Goal::CloseNotify).map(drop)
    }
    fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        self.conn.common().negotiated_cipher_suite().map(|s| s.suite())
    }
    fn peer_name(&self) -> Option<&str> {
        self.peer_name.as_deref()
    }
    #[cfg(feature = "failpoints")]
    fn corrupt_next_record(&mut self) {
        self.corrupt_next = true;
    }
}

impl<C: Unbuffered + 'static> Tls<C> {
    /// The handshake, to its end: a peer that fails it is told why (the
    /// alert rustls sends) and is refused here.
    fn handshake(sock: TcpStream, conn: C) -> Result<Box<dyn Session>, MigrationError> {
        let clone = sock.try_clone().map_err(MigrationError::io("socket"))?;
        let mut tls = Self::new(sock, conn);
        tls.drive(Goal::Handshake).map_err(|e| match into_tls_error(e) {
            Ok(tls) => MigrationError::Refused(format!("TLS handshake failed: {tls}")),
            // I/O errors keep their kind (a peer that closed, or sent
            // nothing in time, is not one that failed TLS).
            Err(io) => MigrationError::Io { context: "TLS handshake failed".into(), source: explain_io(io, &clone, Direction::Read) },
        })?;
        tls.peer_name = tls.conn.common().peer_certificates().and_then(|c| c.first().and_then(|leaf| certificate_names(leaf).into_iter().next()));
        Ok(Box::new(tls))
    }
}
/// A TLS failure (rustls's error), said in words where ours are clearer.
#[derive(Debug)]
struct TlsError(rustls::Error);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use rustls::AlertDescription as A;
        match &self.0 {
            rustls::Error::DecryptError => write!(f, "a TLS record failed authentication (corrupted, replayed or forged)"),
            rustls::Error::AlertReceived(A::BadRecordMac) => {
                write!(f, "the peer found a TLS record that failed authentication (corrupted, replayed or forged): TLS alert bad_record_mac")
            }
            rustls::Error::AlertReceived(alert) => write!(f, "the peer ended the connection with TLS alert {alert:?}"),
            other => write!(f, "TLS: {other}"),
        }
    }
}

impl std::error::Error for TlsError {}

fn tls_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, TlsError(e))
}

/// The TLS error inside `e`, if that is what it is.
fn into_tls_error(e: std::io::Error) -> Result<rustls::Error, std::io::Error> {
    if e.get_ref().is_some_and(|inner| inner.is::<TlsError>()) {
        let inner = e.into_inner().expect("checked above");
        return Ok(inner.downcast::<TlsError>().expect("checked above").0);
    }
    Err(e)
}

/// When a read failed because the peer sent a TLS alert: what the alert
/// says. (A receiver that refuses a damaged record can say nothing more:
/// the alert is its last word on the connection.)
pub fn peer_alert(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<TlsError>()? {
        err @ TlsError(rustls::Error::AlertReceived(_)) => Some(err.to_string()),
        _ => None,
    }
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<dyn Session>),
    /// A pipe pair: an `ssh` child's stdio, or our own with `--stdio`.
    Pipes { read: std::fs::File, write: Option<std::fs::File>, read_timeout: Option<std::time::Duration> },
}

/// One connection (TCP, TLS over TCP, or a pipe pair), shared by a frame
/// reader and a frame writer on the same thread.
pub struct Conn {
    inner: std::rc::Rc<std::cell::RefCell<Inner>>,
    /// The socket, for timeouts and shutdown (None for pipes).
    pub socket: Option<TcpStream>,
    /// Bytes already read that the next reads return first (see
    /// [`Conn::unread`]).
    pending: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
}

impl Conn {
    pub fn plain(socket: TcpStream) -> Result<Self, MigrationError> {
        let clone = socket.try_clone().map_err(MigrationError::io("socket"))?;
        Ok(Self { inner: std::rc::Rc::new(std::cell::RefCell::new(Inner::Plain(socket))), socket: Some(clone), pending: Default::default() })
    }

    /// A connection over two pipes (`read` from the peer, `write` to it).
    pub fn pipes(read: std::fs::File, write: std::fs::File) -> Self {
        Self {
            inner: std::rc::Rc::new(std::cell::RefCell::new(Inner::Pipes { read, write: Some(write), read_timeout: None })),
            socket: None,
            pending: Default::default(),
        }
    }

    /// Longest wait for the peer in a read.
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> Result<(), MigrationError> {
        match (&self.socket, &mut *self.inner.borrow_mut()) {
            (Some(s), _) => s.set_read_timeout(t).map_err(MigrationError::io("socket")),
            (None, Inner::Pipes { read_timeout, .. }) => {
                *read_timeout = t;
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }

    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> Result<(), MigrationError> {
        match &self.socket {
            Some(s) => s.set_write_timeout(t).map_err(MigrationError::io("socket")),
            None => Ok(()),
        }
    }

    /// Tells the peer we send nothing more (it reads end of stream).
    pub fn shutdown_write(&self) {
        match (&self.socket, &mut *self.inner.borrow_mut()) {
            (Some(s), inner) => {
                if let Inner::Tls(tls) = inner {
                    let _ = tls.close_notify();
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            (None, Inner::Pipes { write, .. }) => drop(write.take()),
            (None, _) => {}
        }
    }

    /// Ends the connection both ways.
    pub fn shutdown(&self) {
        self.shutdown_write();
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// TLS client to `host` (checked against the receiver's certificate).
    /// The handshake completes here, so that a bad peer fails early.
    pub fn client(socket: TcpStream, cfg: Arc<ClientConfig>, host: &str) -> Result<Self, MigrationError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| MigrationError::Usage(format!("`{host}` is not a valid TLS server name: {e}")))?;
        let conn = UnbufferedClientConnection::new(cfg, name).map_err(|e| MigrationError::Other(e.to_string()))?;
        let session = Tls::handshake(socket_clone(&socket)?, conn).map_err(|e| match e {
            MigrationError::Refused(m) => MigrationError::Preflight(format!("{m} (connecting to {host})")),
            other => other,
        })?;
        Ok(Self::tls(socket, session))
    }

    /// TLS server; the handshake (and the client's certificate check)
    /// completes before anything else is read.
    pub fn server(socket: TcpStream, cfg: Arc<ServerConfig>) -> Result<Self, MigrationError> {
        let conn = UnbufferedServerConnection::new(cfg).map_err(|e| MigrationError::Other(e.to_string()))?;
        let session = Tls::handshake(socket_clone(&socket)?, conn)?;
        Ok(Self::tls(socket, session))
    }

    fn tls(socket: TcpStream, session: Box<dyn Session>) -> Self {
        Self { inner: std::rc::Rc::new(std::cell::RefCell::new(Inner::Tls(session))), socket: Some(socket), pending: Default::default() }
    }

    /// Another handle on the same connection.
    pub fn handle(&self) -> Result<Conn, MigrationError> {
        let socket = match &self.socket {
            Some(s) => Some(s.try_clone().map_err(MigrationError::io("socket"))?),
            None => None,
        };
        Ok(Conn { inner: self.inner.clone(), socket, pending: self.pending.clone() })
    }

    /// Puts `bytes` back: the next reads, on any handle, return them
    /// before anything more from the peer. (The receiver reads the
    /// sender's Hello under the handshake's deadline, then gives it back
    /// to the session that answers it.)
    pub fn unread(&self, bytes: &[u8]) {
        let mut pending = self.pending.borrow_mut();
        let mut put = bytes.to_vec();
        put.extend_from_slice(&pending);
        *pending = put;
    }

    /// Fault injection (failpoint `sender-corrupt-wire`): the next TLS
    /// record sent has one byte flipped. Nothing without TLS.
    #[cfg(feature = "failpoints")]
    pub fn corrupt_next_record(&self) {
        if let Inner::Tls(tls) = &mut *self.inner.borrow_mut() {
            tls.corrupt_next_record();
        }
    }

    /// The TLS cipher suite in use (None without TLS).
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        match &*self.inner.borrow() {
            Inner::Tls(tls) => tls.cipher_suite(),
            _ => None,
        }
    }

    /// Whether a read would return bytes already received, which a poll
    /// on [`Self::socket`] does not show.
    pub fn has_buffered(&self) -> bool {
        if !self.pending.borrow().is_empty() {
            return true;
        }
        match &*self.inner.borrow() {
            Inner::Tls(tls) => tls.buffered(),
            _ => false,
        }
    }

    /// Who the peer is: the name in its certificate, or its address.
    pub fn peer_identity(&self) -> String {
        let addr = self.socket.as_ref().and_then(|s| s.peer_addr().ok()).map(|a| a.to_string()).unwrap_or_default();
        match &*self.inner.borrow() {
            Inner::Pipes { .. } => "pipe".into(),
            Inner::Plain(_) => format!("insecure:{addr}"),
            Inner::Tls(tls) => format!("tls:{}@{addr}", tls.peer_name().unwrap_or("?")),
        }
    }
}

/// Which way a socket timed out.
#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// A socket timeout's error says what happened, not `os error 11`
/// ("Resource temporarily unavailable", what a blocking socket's timeout
/// returns).
fn explain_io(e: std::io::Error, socket: &TcpStream, dir: Direction) -> std::io::Error {
    if !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
        return e;
    }
    let timeout = match dir {
        Direction::Read => socket.read_timeout(),
        Direction::Write => socket.write_timeout(),
    };
    let waited = timeout.ok().flatten().map(|t| format!(" for {:.0} s", t.as_secs_f64().max(1.0))).unwrap_or_default();
    let what = match dir {
        Direction::Read => format!("nothing came from the peer{waited} (timeout)"),
        Direction::Write => format!("the peer took nothing of what was sent{waited} (timeout)"),
    };
    std::io::Error::new(std::io::ErrorKind::TimedOut, what)
}

fn socket_clone(s: &TcpStream) -> Result<TcpStream, MigrationError> {
    s.try_clone().map_err(MigrationError::io("socket"))
}

impl Conn {
    fn explain(&self, e: std::io::Error, dir: Direction) -> std::io::Error {
        match &self.socket {
            Some(s) => explain_io(e, s, dir),
            None => e,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        {
            let mut pending = self.pending.borrow_mut();
            if !pending.is_empty() {
                let n = buf.len().min(pending.len());
                buf[..n].copy_from_slice(&pending[..n]);
                pending.drain(..n);
                return Ok(n);
            }
        }
        let r = self.read_inner(buf);
        r.map_err(|e| self.explain(e, Direction::Read))
    }
}

impl Conn {
    fn read_inner(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut *self.inner.borrow_mut() {
            Inner::Plain(s) => s.read(buf),
            Inner::Pipes { read, read_timeout, .. } => {
                if let Some(t) = read_timeout {
                    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                    use std::os::fd::AsFd;
                    let ms = PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
                    let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
                    if poll(&mut fds, ms).map_err(std::io::Error::from)? == 0 {
                        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the peer sent nothing in time"));
                    }
                }
                read.read(buf)
            }
            Inner::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.write_inner(buf);
        r.map_err(|e| self.explain(e, Direction::Write))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.flush_inner();
        r.map_err(|e| self.explain(e, Direction::Write))
    }
}

impl Conn {
    fn write_inner(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut *self.inner.borrow_mut() {
            Inner::Plain(s) => s.write(buf),
            Inner::Pipes { write, .. } => match write {
                Some(w) => w.write(buf),
                None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed")),
            },
            Inner::Tls(tls) => {
                tls.send(buf)?;
                Ok(buf.len())
            }
        }
    }

    fn flush_inner(&mut self) -> std::io::Result<()> {
        match &mut *self.inner.borrow_mut() {
            Inner::Plain(s) => s.flush(),
            Inner::Pipes { write, .. } => write.as_mut().map_or(Ok(()), |w| w.flush()),
            // Every write went out whole.
            Inner::Tls(_) => Ok(()),
        }
    }
}

/// DNS names and IP addresses a certificate is for (its SANs, else CN).
pub fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else { return Vec::new() };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                    16 => names.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)));
    }
    names
}

/// `ctmigrate certs init`: a CA and, for each host, a directory usable as
/// its `--tls-dir`. `hosts` are names or IP addresses; each host's
/// certificate carries its own name and serves as server and client.
pub fn init_certs(out: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, MigrationError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let gen = |e: rcgen::Error| MigrationError::Other(format!("generating certificates: {e}"));
    if hosts.is_empty() {
        return Err(MigrationError::Usage("name at least one host with --host".into()));
    }
    let write = |path: &Path, data: &str, mode: u32| -> Result<(), MigrationError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| MigrationError::Usage(format!("{}: {e} (certs init never overwrites)", path.display())))?;
        f.write_all(data.as_bytes()).map_err(MigrationError::io(format!("writing {}", path.display())))
    };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(out).map_err(MigrationError::io(format!("creating {}", out.display())))?;
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params.distinguished_name.push(DnType::CommonName, "ctmigrate CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;
    write(&out.join(CA_FILE), &ca.pem(), 0o644)?;
    write(&out.join("ca-key.pem"), &ca_key.serialize_pem(), 0o600)?;
    let mut dirs = Vec::new();
    for host in hosts {
        let dir = out.join(host);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(MigrationError::io(format!("creating {}", dir.display())))?;
        let key = KeyPair::generate().map_err(gen)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, host.as_str());
        params.subject_alt_names = vec![match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.clone().try_into().map_err(gen)?),
        }];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &ca, &ca_key).map_err(gen)?;
        write(&dir.join(CA_FILE), &ca.pem(), 0o644)?;
        write(&dir.join(CERT_FILE), &cert.pem(), 0o644)?;
        write(&dir.join(KEY_FILE), &key.serialize_pem(), 0o600)?;
        dirs.push(dir);
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_agree_on_a_tls13_suite_and_carry_data() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = init_certs(dir.path(), &["127.0.0.1".to_string()]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_cfg = server_config(&hosts[0]).unwrap();
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut conn = Conn::server(sock, server_cfg).unwrap();
            let mut got = vec![0u8; 3 << 20];
            let mut n = 0;
            while n < got.len() {
                n += conn.read(&mut got[n..]).unwrap();
            }
            (conn.cipher_suite(), got)
        });
        let mut client = Conn::client(TcpStream::connect(addr).unwrap(), client_config(&hosts[0]).unwrap(), "127.0.0.1").unwrap();
        let sent: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).unwrap();
        client.flush().unwrap();
        let (suite, got) = server.join().unwrap();
        assert_eq!(client.cipher_suite(), Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert_eq!(suite, client.cipher_suite());
        assert!(got == sent, "the bytes arrive intact");
    }

    /// Both ends: what one writes right after the handshake (before the
    /// other has read anything) arrives, in both directions.
    fn exchange(client: impl FnOnce(TcpStream) -> Box<dyn ReadWrite>, server: impl FnOnce(TcpStream) -> Box<dyn ReadWrite> + Send + 'static) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let to_server: Vec<u8> = (0..(1u32 << 20) + 7).map(|i| (i % 241) as u8).collect();
        let to_client: Vec<u8> = (0..(1u32 << 20) + 3).map(|i| (i % 239) as u8).collect();
        let (expect, reply) = (to_server.clone(), to_client.clone());
        let serving = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut conn = server(sock);
            let mut got = vec![0u8; expect.len()];
            conn.read_exact(&mut got).unwrap();
            assert!(got == expect, "client to server");
            conn.write_all(&reply).unwrap();
            conn.flush().unwrap();
            // Held open until the client has read the reply.
            let _ = conn.read(&mut [0u8; 1]);
        });
        let mut conn = client(TcpStream::connect(addr).unwrap());
        conn.write_all(&to_server).unwrap();
        conn.flush().unwrap();
        let mut got = vec![0u8; to_client.len()];
        conn.read_exact(&mut got).unwrap();
        assert!(got == to_client, "server to client");
        drop(conn);
        serving.join().unwrap();
    }

    trait ReadWrite: Read + Write {}
    impl<T: Read + Write> ReadWrite for T {}

    #[test]
    fn conn_and_plain_rustls_streams_interoperate() {
        let dir = tempfile::tempdir().unwrap();
        let host = init_certs(dir.path(), &["127.0.0.1".to_string()]).unwrap().remove(0);
        let (c, s) = (client_config(&host).unwrap(), server_config(&host).unwrap());
        // Conn against Conn.
        let (c1, s1) = (c.clone(), s.clone());
        exchange(
            move |sock| Box::new(Conn::client(sock, c1, "127.0.0.1").unwrap()),
            move |sock| Box::new(Conn::server(sock, s1).unwrap()),
        );
        // Conn as the client, rustls's stream as the server.
        let (c2, s2) = (c.clone(), s.clone());
        exchange(
            move |sock| Box::new(Conn::client(sock, c2, "127.0.0.1").unwrap()),
            move |sock| Box::new(rustls::StreamOwned::new(rustls::ServerConnection::new(s2).unwrap(), sock)),
        );
        // rustls's stream as the client, Conn as the server.
        exchange(
            move |sock| Box::new(rustls_client(sock, c)),
            move |sock| Box::new(Conn::server(sock, s).unwrap()),
        );
    }

    fn rustls_client(sock: TcpStream, cfg: Arc<ClientConfig>) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        rustls::StreamOwned::new(rustls::ClientConnection::new(cfg, name).unwrap(), sock)
    }

    /// A Conn server and a plain rustls client on one loopback
    /// connection, their handshake done.
    fn conn_server_and_rustls_client(host: &Path) -> (Conn, rustls::StreamOwned<rustls::ClientConnection, TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client_sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_sock, _) = listener.accept().unwrap();
        for s in [&client_sock, &server_sock] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        }
        let cfg = client_config(host).unwrap();
        let client = std::thread::spawn(move || {
            let mut c = rustls_client(client_sock, cfg);
            while c.conn.is_handshaking() {
                c.conn.complete_io(&mut c.sock).unwrap();
            }
            c
        });
        let server = Conn::server(server_sock, server_config(host).unwrap()).unwrap();
        (server, client.join().unwrap())
    }

    #[test]
    fn data_flows_both_ways_after_the_peer_updates_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let host = init_certs(dir.path(), &["127.0.0.1".to_string()]).unwrap().remove(0);
        let (mut server, mut client) = conn_server_and_rustls_client(&host);
        let before: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let after: Vec<u8> = (0..100_000u32).map(|i| (i % 247) as u8).collect();
        client.write_all(&before).unwrap();
        // A KeyUpdate that asks for ours in return: the peer then reads
        // only what we send under our new keys.
        client.conn.refresh_traffic_keys().unwrap();
        client.write_all(&after).unwrap();
        client.flush().unwrap();
        let mut got = vec![0u8; before.len() + after.len()];
        server.read_exact(&mut got).unwrap();
        assert!(got == [before.clone(), after.clone()].concat(), "the bytes on either side of the key update arrive");
        server.write_all(&after).unwrap();
        server.flush().unwrap();
        let mut back = vec![0u8; after.len()];
        client.read_exact(&mut back).unwrap();
        assert!(back == after, "and the reply, sent under the updated keys, arrives");
        // Again, the other way round in time: the update while we write.
        client.conn.refresh_traffic_keys().unwrap();
        client.write_all(b"!").unwrap();
        server.write_all(&before).unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).unwrap();
        server.write_all(&before).unwrap();
        let mut back = vec![0u8; 2 * before.len()];
        client.read_exact(&mut back).unwrap();
        assert!(back == [before.clone(), before].concat());
    }

    #[test]
    fn a_stream_cut_without_close_notify_is_an_error_and_close_notify_is_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let host = init_certs(dir.path(), &["127.0.0.1".to_string()]).unwrap().remove(0);
        let (mut server, mut client) = conn_server_and_rustls_client(&host);
        client.write_all(b"hello").unwrap();
        client.flush().unwrap();
        // TCP closed at a record boundary, no close_notify: a truncation.
        drop(client);
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        let e = server.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("the peer closed the connection without TLS close_notify"), "{e}");

        let (mut server, mut client) = conn_server_and_rustls_client(&host);
        client.write_all(b"bye").unwrap();
        client.conn.send_close_notify();
        client.flush().unwrap();
        drop(client);
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye", "close_notify ends the stream cleanly");
    }

    #[test]
    fn a_client_certificate_from_another_ca_is_refused_with_an_alert() {
        let dir = tempfile::tempdir().unwrap();
        let host = init_certs(&dir.path().join("ours"), &["127.0.0.1".to_string()]).unwrap().remove(0);
        let other = init_certs(&dir.path().join("theirs"), &["intruder".to_string()]).unwrap().remove(0);
        // Trusts our CA, presents a certificate from another.
        let mixed = dir.path().join("mixed");
        std::fs::create_dir(&mixed).unwrap();
        std::fs::copy(host.join(CA_FILE), mixed.join(CA_FILE)).unwrap();
        std::fs::copy(other.join(CERT_FILE), mixed.join(CERT_FILE)).unwrap();
        std::fs::copy(other.join(KEY_FILE), mixed.join(KEY_FILE)).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = server_config(&host).unwrap();
        let serving = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            Conn::server(sock, cfg).err().map(|e| e.to_string())
        });
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        // In TLS 1.3 the client is done first; the server's verdict on its
        // certificate comes as an alert, which its first read reports.
        let mut client = Conn::client(sock, client_config(&mixed).unwrap(), "127.0.0.1").unwrap();
        let refused = serving.join().unwrap().expect("the server refuses the client");
        assert!(refused.contains("TLS handshake failed: invalid peer certificate"), "{refused}");
        let e = client.read(&mut [0u8; 16]).unwrap_err();
        assert!(e.to_string().contains("the peer ended the connection with TLS alert"), "{e}");
        assert_eq!(peer_alert(&e).as_deref(), Some(e.to_string().as_str()));
    }

    #[test]
    fn a_damaged_record_is_refused_and_the_sender_learns_why_from_the_alert() {
        let dir = tempfile::tempdir().unwrap();
        let host = init_certs(dir.path(), &["127.0.0.1".to_string()]).unwrap().remove(0);
        let (mut server, mut client) = conn_server_and_rustls_client(&host);
        client.write_all(b"intact").unwrap();
        client.flush().unwrap();
        // One bit flipped inside the next record's ciphertext.
        client.conn.writer().write_all(b"damaged").unwrap();
        let mut record = Vec::new();
        client.conn.write_tls(&mut record).unwrap();
        record[8] ^= 0x10;
        client.sock.write_all(&record).unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).unwrap();
        let e = server.read(&mut [0u8; 16]).unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
        assert!(peer_alert(&e).is_none(), "our own verdict, not the peer's");
        // The alert went out: the peer's next read reports it.
        let e = client.read(&mut [0u8; 16]).unwrap_err();
        assert!(e.to_string().contains("BadRecordMac"), "{e}");
        // Nothing more is sent on a connection that failed.
        assert!(server.write_all(b"more").is_err());
    }
}
