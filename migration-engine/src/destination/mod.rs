//! The destination side of a migration, one file a phase:
//!
//! | phase | file | a failure there |
//! |---|---|---|
//! | connections, handshake deadline, bounds | [`listener`] | the connection is dropped |
//! | Hello, version, Manifest or a source's Query | this file | nothing stored |
//! | manifest checked, admitted, staged, accepted | [`accept`], [`admission`], [`staging`] | refused; nothing stored |
//! | rootfs passes and image rounds, verified | [`transfer`] | the staged copy is removed |
//! | restore (tasks stopped), Ready, Commit, run | [`restore`] | before the Commit the copy is removed; after it, it runs |
//!
//! Everything created for a migration (bundle, images, runtime state)
//! belongs to a [`staging::Staging`] that removes it all unless the
//! sender's Commit arrived. A receiver that was killed cannot clean up
//! after itself, so every receiver start sweeps what dead receivers left
//! (see [`sweep_stale`]).

use std::io::BufWriter;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use container_runtime::{validate_container_id, BundlePolicy, EmptyTmpfs, Runc};
use migration_protocol::{
    RootfsPhase,
    negotiate_version, ErrorCode, ErrorMessage, Frame, FrameReader, FrameWriter, Hello, HelloAck, ImagesDone,
    Manifest, ManifestAccepted, MessageKind, ProtocolError, Query, QueryAnswer, Ready, RoundBegin, RoundDone, RoundKind,
};
use migration_protocol::state::DestinationEvent;
use migration_protocol::{DestinationMachine, DestinationState};

use crate::journal::{DestinationPlan, Entry, Journal, Role, Side};

use container_network::{DestinationNetwork, NetworkRecord};

use crate::error::Outcome;
use crate::events::{Event, Phase, ResultEvent};
use crate::images::ImageSink;
use crate::source::round_dir;
use crate::{rootfs, MigrationError, Reporter};

mod accept;
pub mod admission;
mod host;
pub mod listener;
mod pods;
mod postcopy;
mod restore;
mod staging;
mod transfer;

pub use staging::sweep_stale;
use staging::Staging;
pub(crate) use host::{DestinationHost, RealDestinationHost, RestoreRequest};
use std::sync::Arc;
#[cfg(test)]
mod tests;

#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    pub listen: String,
    /// Serve one migration, then exit with its result.
    pub once: bool,
    pub bundle_root: PathBuf,
    pub runtime_root: PathBuf,
    pub cgroup_parent: String,
    pub work_root: PathBuf,
    pub runc_binary: PathBuf,
    pub io_timeout: Duration,
    /// Largest single image file accepted.
    pub max_image_file: u64,
    pub max_image_files: usize,
    /// Most payload bytes one migration may send (`--max-bytes`).
    pub max_bytes: u64,
    pub security: crate::tls::Security,
    pub audit_log: PathBuf,
    /// Host paths containers may bind-mount (`--allow-bind-source`).
    pub allowed_bind_sources: Vec<PathBuf>,
    pub unpack: rootfs::UnpackPolicy,
    /// Bridge that the host ends of migrated containers' interfaces join
    /// (`--bridge`).
    pub bridge: Option<String>,
    /// Where received images wait for the restore (`--stage-images`).
    pub stage_images: crate::scratch::StageMode,
    /// This host's migration journal (`--journal-dir`).
    pub journal_dir: PathBuf,
    /// From accept to the sender's Hello, in all (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// Connections in their handshake at once (`--max-handshakes`), and
    /// from one address (`--max-handshakes-per-ip`).
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    /// Migrations served at once (`--max-migrations`).
    pub max_migrations: usize,
    /// Bytes all migrations in flight may reserve for images in memory
    /// (`--staging-memory`); None: three quarters of MemAvailable.
    pub staging_memory: Option<u64>,
}

pub(crate) use container_runtime::bundle::INCOMPLETE_MARKER;

/// The line of the bundle's CRIU configuration that makes the restore
/// leave every task stopped.
const LEAVE_STOPPED: &str = "leave-stopped\n";

/// Listens and serves migrations, several at once (see
/// [`crate::listener`] for the handshake's bounds and [`crate::admission`]
/// for what is admitted after it). With `once`, returns the outcome of the
/// first migration that got past the handshake.
pub fn receive(opts: &ReceiveOptions, rep: &Reporter) -> Result<(), (MigrationError, Outcome)> {
    let runc = Runc::new(&opts.runc_binary, &opts.runtime_root);
    let tls = match &opts.security {
        crate::tls::Security::Tls(dir) => Some(crate::tls::server_config(dir).map_err(|e| (e, Outcome::NothingTouched))?),
        crate::tls::Security::Insecure => {
            rep.warn("--insecure: accepting unauthenticated, unencrypted migrations");
            None
        }
    };
    sweep_stale(opts, &runc, rep);
    let listener = TcpListener::bind(&opts.listen).map_err(|e| {
        (
            MigrationError::Preflight(format!("cannot listen on {}: {e}; pick another address or port", opts.listen)),
            Outcome::NothingTouched,
        )
    })?;
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| opts.listen.clone());
    rep.emit(Event::Listening { addr: local });
    let limits = crate::admission::AdmissionLimits::from(opts);
    let handshake_limits = crate::listener::HandshakeLimits {
        timeout: opts.handshake_timeout,
        max_total: opts.max_handshakes,
        max_per_ip: opts.max_handshakes_per_ip,
    };
    // One thread per connection: each returns Some(outcome) for a
    // migration that got past the handshake.
    let results = crate::listener::serve(&listener, &handshake_limits, opts.once, rep, &opts.audit_log, |stream, handshake| {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        rep.emit(Event::Accepted { peer: peer.clone() });
        // A signal cuts this connection (and every other); the session
        // then cleans up.
        let _cut = crate::interrupt::register_connection(&stream);
        let established = establish(opts, tls.clone(), stream, handshake.timeout())
            .and_then(|conn| handshake.finish().map(|()| conn).map_err(|e| MigrationError::Refused(e.to_string())));
        let conn = match established {
            Ok(conn) => conn,
            Err(e) => {
                // Until the peer is authenticated nothing is stored and
                // nothing but a TLS alert is answered.
                not_served(opts, rep, &format!("unauthenticated:{peer}"), &e, None);
                return None;
            }
        };
        match crate::admission::REGISTRY.begin(&limits) {
            Ok(slot) => match serve(opts, &runc, conn, rep) {
                // A source's query is not a migration: it neither counts
                // for --once nor holds a migration slot.
                Ok(Served::Query) => {
                    slot.not_a_migration();
                    None
                }
                other => Some(other.map(|_| ())),
            },
            Err(refusal) => {
                // Told why in the sender's place of HelloAck: it stops
                // with nothing touched.
                let identity = conn.peer_identity();
                not_served(opts, rep, &identity, &MigrationError::Refused(refusal.to_string()), Some(conn));
                None
            }
        }
    })
    .map_err(|e| (MigrationError::io("listening")(e), Outcome::NothingTouched))?;
    if !crate::interrupt::interrupted() {
        // With --once, the first migration's; else the loop never ends.
        return results.into_iter().next().unwrap_or(Ok(()));
    }
    stopped(results, rep)
}

/// A receiver stopped by a signal (SIGTERM from systemd, say): it accepts
/// nothing more, and every migration in flight was cut (and rolled back)
/// or had got past its Commit (and runs here). A clean stop is a success;
/// a migration that did not end in either way is the receiver's result.
fn stopped(results: Vec<Result<(), (MigrationError, Outcome)>>, rep: &Reporter) -> Result<(), (MigrationError, Outcome)> {
    let rolled_back = |o: &Outcome| matches!(o, Outcome::NothingTouched | Outcome::SourceResumed);
    let (mut completed, mut undone) = (0, 0);
    for r in &results {
        match r {
            Ok(()) => completed += 1,
            Err((_, o)) if rolled_back(o) => undone += 1,
            Err(_) => {}
        }
    }
    if let Some(failed) = results.into_iter().find(|r| r.as_ref().is_err_and(|(_, o)| !rolled_back(o))) {
        return failed;
    }
    rep.note(format!("stopped by a signal: {completed} migration(s) in flight completed, {undone} rolled back; nothing is left in flight"));
    Ok(())
}

/// A connection that is not served: its result event and audit line, and
/// (when `conn` is given, the peer authenticated) an Error message telling
/// the sender why.
fn not_served(opts: &ReceiveOptions, rep: &Reporter, identity: &str, e: &MigrationError, conn: Option<crate::tls::Conn>) {
    if let Some(conn) = conn {
        let message = match e {
            MigrationError::Refused(m) => m.clone(),
            other => other.to_string(),
        };
        let mut writer = FrameWriter::new(BufWriter::new(conn));
        let _ = writer.write_json(MessageKind::Error, &ErrorMessage { code: ErrorCode::Refused, message });
        let _ = writer.flush();
    }
    let mut result = ResultEvent { role: "receiver", ..Default::default() };
    result.error = Some(e.to_string());
    result.exit_code = Some(Outcome::NothingTouched.exit_code());
    let _ = crate::audit::record(&opts.audit_log, identity, &result);
    result.usage = Some(crate::events::ResourceUsage::measure());
    rep.emit(Event::Result(result));
}

/// The largest Hello accepted: nothing larger is read (or allocated for)
/// before the peer's first frame has been checked.
const MAX_HELLO: u32 = 64 * 1024;

/// Timeouts, the TLS handshake (and client certificate check), then the
/// sender's Hello, read under the handshake's deadline and given back to
/// the session ([`crate::tls::Conn::unread`]) that answers it.
fn establish(
    opts: &ReceiveOptions,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    stream: TcpStream,
    handshake_timeout: Duration,
) -> Result<crate::tls::Conn, MigrationError> {
    // The listener's watchdog keeps the handshake's one deadline; these
    // bound each read and write within it.
    stream.set_read_timeout(Some(handshake_timeout)).map_err(MigrationError::io("socket"))?;
    stream.set_write_timeout(Some(handshake_timeout)).map_err(MigrationError::io("socket"))?;
    let _ = stream.set_nodelay(true);
    let mut conn = match tls {
        Some(cfg) => crate::tls::Conn::server(stream, cfg)?,
        None => crate::tls::Conn::plain(stream)?,
    };
    // The Hello's header first: its claimed sizes are checked before a
    // byte more is read.
    use std::io::Read;
    let mut hello = vec![0u8; migration_protocol::FRAME_HEADER_LEN];
    conn.read_exact(&mut hello).map_err(|e| MigrationError::Io { context: "reading the sender's Hello".into(), source: e })?;
    // Frame header: magic, format, kind, flags, then wire_len and raw_len
    // (little-endian u32 at 12 and 16; docs/protocol.md).
    let len = |at: usize| u32::from_le_bytes(hello[at..at + 4].try_into().expect("4 bytes"));
    let (wire_len, raw_len) = (len(12), len(16));
    if wire_len > MAX_HELLO || raw_len > MAX_HELLO {
        return Err(MigrationError::Refused(format!(
            "the peer's first frame claims {} bytes; a Hello is at most {MAX_HELLO}",
            wire_len.max(raw_len)
        )));
    }
    hello.resize(migration_protocol::FRAME_HEADER_LEN + wire_len as usize, 0);
    conn.read_exact(&mut hello[migration_protocol::FRAME_HEADER_LEN..])
        .map_err(|e| MigrationError::Io { context: "reading the sender's Hello".into(), source: e })?;
    // Checked whole (magic, checksum, kind) now; parsed by the session.
    FrameReader::new(&hello[..]).read_frame()?.expect(MessageKind::Hello, "Hello")?;
    conn.unread(&hello);
    conn.set_read_timeout(Some(opts.io_timeout))?;
    conn.set_write_timeout(Some(opts.io_timeout))?;
    Ok(conn)
}

/// `receive --stdio`: one migration over stdin and stdout, as run by a
/// sender's `ssh` (which authenticated and encrypts the stream).
pub fn receive_stdio(opts: &ReceiveOptions, rep: &Reporter) -> Result<(), (MigrationError, Outcome)> {
    use std::os::fd::AsFd;
    let runc = Runc::new(&opts.runc_binary, &opts.runtime_root);
    sweep_stale(opts, &runc, rep);
    let dup = |fd: std::os::fd::BorrowedFd<'_>| -> Result<std::fs::File, (MigrationError, Outcome)> {
        fd.try_clone_to_owned()
            .map(std::fs::File::from)
            .map_err(|e| (MigrationError::io("duplicating stdio")(e), Outcome::NothingTouched))
    };
    let conn = crate::tls::Conn::pipes(dup(std::io::stdin().as_fd())?, dup(std::io::stdout().as_fd())?);
    conn.set_read_timeout(Some(opts.io_timeout)).map_err(|e| (e, Outcome::NothingTouched))?;
    // ssh tells who connected: "CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT".
    let who = std::env::var("SSH_CONNECTION").ok().and_then(|c| c.split_whitespace().next().map(str::to_string));
    let user = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_default();
    let identity = format!("ssh:{user}@{}", who.unwrap_or_else(|| "local".into()));
    serve_as(opts, &runc, real_host(&runc), conn, identity, rep).map(|_| ())
}

/// Serves one connection and emits its result event.
fn serve(opts: &ReceiveOptions, runc: &Runc, conn: crate::tls::Conn, rep: &Reporter) -> Result<Served, (MigrationError, Outcome)> {
    let identity = conn.peer_identity();
    serve_as(opts, runc, real_host(runc), conn, identity, rep)
}

fn real_host(runc: &Runc) -> Arc<dyn DestinationHost> {
    Arc::new(RealDestinationHost { runc: runc.clone() })
}

fn serve_as(
    opts: &ReceiveOptions,
    runc: &Runc,
    host: Arc<dyn DestinationHost>,
    conn: crate::tls::Conn,
    identity: String,
    rep: &Reporter,
) -> Result<Served, (MigrationError, Outcome)> {
    let started = Instant::now();
    let mut result = ResultEvent { role: "receiver", mode: "stop-copy".into(), ..Default::default() };
    let mut session = Session::new(opts, runc, host, conn, rep).map_err(|e| (e, Outcome::NothingTouched))?;
    let outcome = session.run(&mut result, &identity);
    if session.query_only {
        return outcome.map(|()| Served::Query);
    }
    if let (Some(seat), Err(_)) = (&session.pod, &outcome) {
        // A member that failed before its pod was decided aborts it (a
        // no-op once committed: its copy is then the container's).
        pods::PODS.decide(&seat.pod_id, pods::Decision::Aborted, &|| true);
        if seat.leads {
            pods::PODS.leader_gone(&seat.pod_id);
        }
    }
    // The exit code follows from the state the failure left.
    let outcome = outcome.map_err(|(e, o)| {
        use migration_protocol::state::DestinationRecovery::*;
        let from_state = match session.machine.on_failure() {
            NothingStored => Outcome::NothingTouched,
            RemoveAll => Outcome::SourceResumed,
            KeepCopy => Outcome::SourceNotResumed,
            None => o,
        };
        (e, from_state)
    });
    result.total_ms = started.elapsed().as_millis() as u64;
    result.bytes_sent = session.reader.wire_bytes;
    result.bytes_raw = session.sink_bytes;
    result.tcp_nudged = session.tcp_nudged;
    result.frozen_ms = session.frozen_ms;
    match &outcome {
        Ok(()) => result.ok = true,
        Err((e, o)) => {
            // CRIU's and runc's logs outlive the staging directory.
            let kept = session.staging.as_ref().and_then(|st| {
                crate::failure_logs::keep(&st.work_dir, &crate::failure_logs::dir_for(&opts.audit_log), "receiver", &st.dest_id)
                    .map(|kept| (st.work_dir.clone(), kept))
            });
            let explain = |m: String| match &kept {
                Some((work, kept)) => crate::failure_logs::point_at_kept(&m, work, kept),
                None => m,
            };
            result.error = Some(explain(e.to_string()));
            result.exit_code = Some(o.exit_code());
            // Tell the sender why, if it still listens.
            let code = e.peer_code();
            let message = explain(match e {
                MigrationError::Refused(m) | MigrationError::Remote(m) => m.clone(),
                other => other.to_string(),
            });
            let _ = session.writer.write_json(MessageKind::Error, &ErrorMessage { code, message });
            let _ = session.writer.flush();
        }
    }
    // Whatever was not committed goes now, before the next connection:
    // journalled first, so that a source asking from now on hears
    // "aborted", and a receiver dying midway finishes the removal.
    if outcome.is_err() && !session.machine.copy_may_run() && session.machine.on(DestinationEvent::Failed).is_ok() {
        if let Some(entry) = session.entry.as_mut() {
            entry.set_destination_state(session.machine.state());
            if let Err(e) = session.journal.write(entry) {
                rep.warn(format!("cannot journal the abort: {e}"));
            }
        }
    }
    drop(session.staging.take());
    if let Err(e) = crate::audit::record(&opts.audit_log, &identity, &result) {
        rep.warn(format!("cannot write the audit log {}: {e}", opts.audit_log.display()));
    }
    result.usage = Some(crate::events::ResourceUsage::measure());
    rep.emit(Event::Result(result));
    outcome.map(|()| Served::Migration)
}

/// What a connection was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Migration,
    /// A source in doubt asked about a migration.
    Query,
}

struct Session<'a> {
    opts: &'a ReceiveOptions,
    /// For answering a source's query about a finished migration.
    runc: &'a Runc,
    /// Everything done to the container and the host (see [`host`]).
    host: Arc<dyn DestinationHost>,
    rep: &'a Reporter,
    control: crate::tls::Conn,
    reader: FrameReader<crate::tls::Conn>,
    writer: FrameWriter<BufWriter<crate::tls::Conn>>,
    staging: Option<Staging>,
    sink_bytes: u64,
    /// Where the migration stands; decides what a failure does.
    machine: DestinationMachine,
    journal: Journal,
    /// This migration's journal entry, once admitted.
    entry: Option<Entry>,
    /// The connection was a source's query, not a migration.
    query_only: bool,
    /// Post-copy: the lazy-pages daemon, from before the restore until
    /// every page arrived.
    lazy: Option<postcopy::LazyDestination>,
    /// When Ready went (CLOCK_MONOTONIC ms): a post-copy lease runs from
    /// then.
    ready_sent_ms: u64,
    /// The protocol version agreed at the handshake.
    version: u32,
    /// The restored copy's init pid and its established TCP connections,
    /// read from the images at the restore: their peers are nudged once
    /// the copy runs (see [`container_network::nudge`]).
    nudge: Option<(i32, Vec<container_network::nudge::TcpConnection>)>,
    /// How many peers were nudged, for the result.
    tcp_nudged: Option<u64>,
    /// When the frozen rootfs pass began to arrive (the source had just
    /// frozen), and from then until the copy ran.
    frozen_since: Option<Instant>,
    frozen_ms: Option<u64>,
    /// This container's place in its pod, once admitted (see [`pods`]);
    /// after `staging`, so that it goes after the copy it staged.
    pod: Option<pods::PodSeat>,
    /// Until the source froze, this session yields the CPUs to sessions
    /// whose source is frozen (see [`crate::priority`]).
    background: Option<crate::priority::Background>,
}

fn refused(msg: String) -> (MigrationError, Outcome) {
    (MigrationError::Refused(msg), Outcome::NothingTouched)
}

impl<'a> Session<'a> {
    fn new(
        opts: &'a ReceiveOptions,
        runc: &'a Runc,
        host: Arc<dyn DestinationHost>,
        conn: crate::tls::Conn,
        rep: &'a Reporter,
    ) -> Result<Self, MigrationError> {
        Ok(Self {
            opts,
            runc,
            host,
            rep,
            reader: FrameReader::new(conn.handle()?).with_limit(opts.max_bytes),
            control: conn.handle()?,
            writer: FrameWriter::new(BufWriter::new(conn)),
            staging: None,
            sink_bytes: 0,
            machine: DestinationMachine::new(),
            journal: Journal::new(&opts.journal_dir),
            entry: None,
            query_only: false,
            lazy: None,
            ready_sent_ms: 0,
            version: 0,
            nudge: None,
            tcp_nudged: None,
            frozen_since: None,
            frozen_ms: None,
            pod: None,
            background: Some(crate::priority::Background::enter()),
        })
    }

    /// Moves the machine on and journals the new state (before the act it
    /// allows: the caller acts after this returns). Restoring and
    /// ready-stopped are not written (each write is an fsync, and these sit
    /// in the source's frozen window): for a process settling the migration
    /// they mean what receiving means, remove the copy.
    fn step(&mut self, event: DestinationEvent) -> Result<(), MigrationError> {
        let state = self.machine.on(event).map_err(|e| MigrationError::Other(format!("internal: {e}")))?;
        if matches!(state, DestinationState::Restoring | DestinationState::ReadyStopped) {
            return Ok(());
        }
        if let Some(entry) = self.entry.as_mut() {
            entry.set_destination_state(state);
            self.journal.write(entry).map_err(|e| MigrationError::Other(e.to_string()))?;
        }
        Ok(())
    }

    /// Answers a source in doubt about one of its migrations.
    fn answer_query(&mut self, frame: Frame) -> Result<(), MigrationError> {
        let q: Query = frame.json()?;
        let decision = crate::resolve::answer_query(&self.journal, self.runc, &q);
        self.rep.warn(format!("a source asked about migration {}: answered {decision:?}", q.migration_id));
        self.writer.write_json(MessageKind::QueryAnswer, &QueryAnswer { migration_id: q.migration_id, decision })?;
        self.writer.flush()?;
        Ok(())
    }

    fn read(&mut self) -> Result<Frame, MigrationError> {
        let f = self.reader.read_frame()?;
        if f.kind == MessageKind::Abort {
            let a: migration_protocol::Abort = f.json()?;
            return Err(MigrationError::Aborted(a.reason));
        }
        Ok(f)
    }

    /// One migration, phase by phase; see the module's table for what a
    /// failure in each leaves.
    fn run(&mut self, result: &mut ResultEvent, peer: &str) -> Result<(), (MigrationError, Outcome)> {
        let Some(manifest) = self.handshake()? else { return Ok(()) };
        self.admit(&manifest, result, peer)?;
        self.transfer(&manifest, result)?;
        self.restore(&manifest)?;
        if manifest.postcopy() {
            self.postcopy(&manifest, self.ready_sent_ms)?;
        }
        self.commit(&manifest)
    }

    /// Hello and version; then a Manifest, or a source's Query (answered
    /// here: None). Nothing is stored.
    fn handshake(&mut self) -> Result<Option<Manifest>, (MigrationError, Outcome)> {
        let nothing = |e: MigrationError| (e, Outcome::NothingTouched);
        let hello: Hello = self.read().and_then(|f| Ok(f.expect(MessageKind::Hello, "Hello")?.json()?)).map_err(nothing)?;
        let version = negotiate_version(hello.min_version, hello.max_version).map_err(|e| nothing(e.into()))?;
        self.writer
            .write_json(MessageKind::HelloAck, &HelloAck { version, software: crate::software() })
            .map_err(|e| nothing(e.into()))?;
        self.writer.flush().map_err(|e| nothing(e.into()))?;
        self.machine.on(DestinationEvent::Hello).map_err(|e| nothing(MigrationError::Other(e.to_string())))?;
        self.version = version;
        let first = self.read().map_err(nothing)?;
        if first.kind == MessageKind::Query {
            self.query_only = true;
            return self.answer_query(first).map(|()| None).map_err(nothing);
        }
        let manifest: Manifest = first.expect(MessageKind::Manifest, "Manifest").map_err(|e| nothing(e.into()))?.json().map_err(|e| nothing(e.into()))?;
        Ok(Some(manifest))
    }

}

/// The frozen rootfs pass's verification, running.
type RootfsCheck = std::thread::JoinHandle<Result<rootfs::Verified, MigrationError>>;
