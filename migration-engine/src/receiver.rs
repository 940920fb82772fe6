//! The destination side of a migration.
//!
//! A receiver serves several connections at once ([`crate::listener`],
//! [`crate::admission`]). Everything it creates for a
//! migration (bundle, images, runtime state) belongs to a [`Staging`] that
//! removes it all unless the sender's Commit arrived. A receiver that was
//! killed cannot clean up after itself, so every receiver start sweeps what
//! dead receivers left (see [`sweep_stale`]).

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

/// Marker in a bundle that is not committed yet: holds the receiver's pid.
pub(crate) const INCOMPLETE_MARKER: &str = ".ctmigrate-incomplete";

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
    // Interrupted: every migration in flight was cut and rolled back.
    match results.into_iter().find(Result::is_err) {
        Some(failed) => failed,
        None => Err((MigrationError::Other("interrupted by a signal".into()), Outcome::NothingTouched)),
    }
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
    serve_as(opts, &runc, conn, identity, rep).map(|_| ())
}

/// Serves one connection and emits its result event.
fn serve(opts: &ReceiveOptions, runc: &Runc, conn: crate::tls::Conn, rep: &Reporter) -> Result<Served, (MigrationError, Outcome)> {
    let identity = conn.peer_identity();
    serve_as(opts, runc, conn, identity, rep)
}

fn serve_as(
    opts: &ReceiveOptions,
    runc: &Runc,
    conn: crate::tls::Conn,
    identity: String,
    rep: &Reporter,
) -> Result<Served, (MigrationError, Outcome)> {
    let started = Instant::now();
    let mut result = ResultEvent { role: "receiver", mode: "stop-copy".into(), ..Default::default() };
    let mut session = Session::new(opts, runc, conn, rep).map_err(|e| (e, Outcome::NothingTouched))?;
    let outcome = session.run(&mut result, &identity);
    if session.query_only {
        return outcome.map(|()| Served::Query);
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
    runc: &'a Runc,
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
}

fn refused(msg: String) -> (MigrationError, Outcome) {
    (MigrationError::Refused(msg), Outcome::NothingTouched)
}

impl<'a> Session<'a> {
    fn new(
        opts: &'a ReceiveOptions,
        runc: &'a Runc,
        conn: crate::tls::Conn,
        rep: &'a Reporter,
    ) -> Result<Self, MigrationError> {
        Ok(Self {
            opts,
            runc,
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

    fn run(&mut self, result: &mut ResultEvent, peer: &str) -> Result<(), (MigrationError, Outcome)> {
        let nothing = |e: MigrationError| (e, Outcome::NothingTouched);
        let resumed = |e: MigrationError| (e, Outcome::SourceResumed);
        // Handshake. Until the manifest is accepted nothing is stored.
        let hello: Hello = self.read().and_then(|f| Ok(f.expect(MessageKind::Hello, "Hello")?.json()?)).map_err(nothing)?;
        let version = negotiate_version(hello.min_version, hello.max_version).map_err(|e| nothing(e.into()))?;
        self.writer
            .write_json(MessageKind::HelloAck, &HelloAck { version, software: crate::software() })
            .map_err(|e| nothing(e.into()))?;
        self.writer.flush().map_err(|e| nothing(e.into()))?;
        self.machine.on(DestinationEvent::Hello).map_err(|e| nothing(MigrationError::Other(e.to_string())))?;
        let first = self.read().map_err(nothing)?;
        if first.kind == MessageKind::Query {
            self.query_only = true;
            return self.answer_query(first).map_err(nothing);
        }
        let manifest: Manifest = first.expect(MessageKind::Manifest, "Manifest").map_err(|e| nothing(e.into()))?.json().map_err(|e| nothing(e.into()))?;
        result.container = manifest.container_id.clone();
        result.dest_id = manifest.dest_id.clone();
        self.rep.emit(Event::Start {
            role: "receiver",
            container: manifest.container_id.clone(),
            dest_id: manifest.dest_id.clone(),
            peer: peer.to_string(),
            mode: manifest.mode.clone(),
            mode_reason: None,
        });
        // Admitted beside the migrations in flight: its destination id, and
        // the memory its images reserve. Refused here, the source is never
        // frozen.
        let admitted = crate::admission::REGISTRY
            .admit(&self.opts.into(), &manifest.dest_id, self.opts.stage_images, manifest.memory_bytes)
            .map_err(|e| refused(e.to_string()))?;
        let (spec, criu_config) = self.check_manifest(&manifest)?;
        migration_protocol::validate_migration_id(&manifest.migration_id).map_err(refused)?;
        result.migration_id = Some(manifest.migration_id.clone());
        if self.journal.load(Role::Destination, &manifest.migration_id).ok().flatten().is_some() {
            return Err(refused(format!("migration {} was already received here: a sender reusing an id is refused", manifest.migration_id)));
        }
        let mut staging = Staging::create(self.opts, self.runc, &manifest.dest_id).map_err(nothing)?;
        let in_memory = admitted.in_memory();
        staging.admission = Some(admitted);
        // The manifest's wire records as the domain types (checked by
        // check_manifest, on the same conversion).
        let network: Option<NetworkRecord> = manifest.network.clone().map(Into::into);
        let plan = DestinationPlan {
            runtime_root: self.opts.runtime_root.clone(),
            runc_binary: self.opts.runc_binary.clone(),
            bundle: staging.bundle.clone(),
            work_dir: staging.work_dir.clone(),
            network: network.clone(),
        };
        self.entry = Some(Entry::new(
            &manifest.migration_id,
            &manifest.container_id,
            &manifest.dest_id,
            peer,
            Side::Destination { state: DestinationState::AwaitingManifest, plan },
        ));
        self.staging = Some(staging);
        self.step(DestinationEvent::Admitted).map_err(nothing)?;
        let mut staging = self.staging.take().expect("just set");
        if let Some(size) = crate::scratch::memory_stage_size(crate::scratch::StageMode::Memory, manifest.memory_bytes).filter(|_| in_memory) {
            crate::scratch::mount_tmpfs(&staging.images, size).map_err(nothing)?;
            staging.reserve =
                Some(crate::scratch::Reserve::create(&staging.images, manifest.memory_bytes).map_err(|e| refused(e.to_string()))?);
            staging.restore_block = Some(
                crate::scratch::Reserve::create_named(
                    &staging.images,
                    "restore-block",
                    crate::scratch::restore_block_bytes(manifest.memory_bytes),
                )
                .map_err(|e| refused(e.to_string()))?,
            );
        }
        if let Some(record) = &network {
            // Built now, before the source freezes; the host ends stay down
            // until the container is restored.
            let built = DestinationNetwork::build(record, &manifest.dest_id, self.opts.bridge.as_deref())
                .map_err(|e| refused(format!("cannot rebuild the container's network: {e}")))?;
            staging.network = Some(built);
        }
        let mut criu_config = criu_config;
        for (index, tmpfs) in manifest.empty_tmpfs.iter().cloned().map(EmptyTmpfs::from).enumerate() {
            let dir = staging.mount_empty_tmpfs(index, &tmpfs).map_err(nothing)?;
            criu_config.push_str(&format!("external mnt[{}]:{}\n", EmptyTmpfs::external_key(index), dir.display()));
        }
        let config_path = staging.bundle.join("config.json");
        spec.save(&config_path)
            .map_err(|e| nothing(MigrationError::Other(format!("writing {}: {e}", config_path.display()))))?;
        // The fence: the restore leaves every task stopped until Commit.
        criu_config.push_str(LEAVE_STOPPED);
        std::fs::write(staging.bundle.join(container_runtime::bundle::CRIU_RESTORE_CONFIG), criu_config)
            .map_err(|e| nothing(MigrationError::io("writing the CRIU restore configuration")(e)))?;
        let bundle = staging.bundle.display().to_string();
        self.staging = Some(staging);
        self.writer
            .write_json(MessageKind::ManifestAccepted, &ManifestAccepted { bundle })
            .map_err(|e| resumed(e.into()))?;
        self.writer.flush().map_err(|e| resumed(e.into()))?;
        failpoint!("receiver-after-manifest").map_err(resumed)?;

        // Rootfs passes and images, in whatever order the sender sends them.
        self.rep.phase(Phase::Transfer);
        let (done, rootfs_check) = self.receive_state(manifest.max_rounds).map_err(resumed)?;
        result.image_bytes = done.files.iter().map(|f| f.size).sum();
        // Nothing runs from a rootfs that is not the source's.
        let wait_started = Instant::now();
        let verified = rootfs_check
            .join()
            .map_err(|_| resumed(MigrationError::Other("the rootfs verification thread panicked".into())))?
            .map_err(resumed)?;
        result.rootfs_verified = true;
        result.rootfs = Some(crate::events::RootfsReport {
            digest: verified.digest,
            entries: verified.entries,
            verify_ms: Some(verified.took.as_millis() as u64),
            verify_wait_ms: Some(wait_started.elapsed().as_millis() as u64),
            ..Default::default()
        });
        failpoint!("receiver-before-restore").map_err(resumed)?;
        if corrupt_at!("receiver-before-restore") {
            // As a disk that lost a file after it was verified: CRIU's
            // restore fails for real, with a log to keep.
            let st = self.staging.as_ref().expect("staging exists");
            let _ = std::fs::remove_file(st.images.join(round_dir(RoundKind::Final, 0)).join("inventory.img"));
        }

        self.step(DestinationEvent::StateVerified).map_err(resumed)?;
        self.rep.phase(Phase::Restore);
        let restore_started = Instant::now();
        let st = self.staging.as_mut().expect("staging exists");
        st.restore_attempted = true;
        // What the images did not use goes back before the restore needs it.
        st.reserve = None;
        // The restore's first read block is handed over as CRIU takes it,
        // on the CPU CRIU's restorer runs on.
        let block = st.restore_block.take();
        let mut handover = None;
        let restored = self.runc.restore(
            &manifest.dest_id,
            &st.bundle,
            &st.images.join(round_dir(RoundKind::Final, 0)),
            &st.work,
            manifest.tcp_established,
            |runc_pid| {
                let mut restorer = crate::scratch::BusiestTask::new(runc_pid);
                handover = block.map(|b| b.hand_over(move || restorer.seen()));
            },
        );
        drop(handover);
        restored.map_err(|e| resumed(MigrationError::Remote(format!("restore on the destination failed: {e}"))))?;
        // The fence: CRIU left every task stopped (the bundle's CRIU
        // configuration says so); none may run before the Commit.
        let pid = self
            .runc
            .live_init_pid(&manifest.dest_id)
            .map_err(|e| resumed(MigrationError::Remote(format!("the restored container is not running: {e}"))))?;
        let tasks = crate::settle::check_stopped(self.runc, &manifest.dest_id).map_err(|e| resumed(MigrationError::Remote(e.to_string())))?;
        // Later checkpoints of this container (runc reads the same file)
        // must not leave their tasks stopped.
        st.drop_leave_stopped().map_err(resumed)?;
        let restore_ms = restore_started.elapsed().as_millis() as u64;
        self.step(DestinationEvent::RestoredStopped).map_err(resumed)?;
        self.rep.warn(format!("restored `{}` with its {tasks} task(s) stopped; waiting for the sender's Commit", manifest.dest_id));
        failpoint!("receiver-after-restore").map_err(resumed)?;
        self.writer
            .write_json(MessageKind::Ready, &Ready { pid, restore_ms })
            .map_err(|e| resumed(e.into()))?;
        self.writer.flush().map_err(|e| resumed(e.into()))?;

        // Wait for the sender's Commit; anything else (an Abort, silence
        // past --timeout, a lost connection) removes the stopped copy.
        self.rep.phase(Phase::Commit);
        failpoint!("receiver-after-ready").map_err(resumed)?;
        let commit = self.read().and_then(|f| Ok(f.expect(MessageKind::Commit, "Commit")?));
        if let Err(e) = commit {
            return Err(resumed(MigrationError::Aborted(format!("no commit from the sender ({e}); the restored copy was removed"))));
        }
        // Committed, journalled before anything runs: from here the copy
        // is the container, never removed by this receiver.
        self.step(DestinationEvent::CommitReceived).map_err(resumed)?;
        failpoint!("receiver-after-commit-journalled").map_err(resumed)?;
        let plan = match &self.entry.as_ref().expect("admitted").side {
            Side::Destination { plan, .. } => plan.clone(),
            Side::Source { .. } => unreachable!("a receiver's entry is a destination entry"),
        };
        if let Some(st) = self.staging.take() {
            st.commit();
        }
        crate::settle::run_destination(&plan, &manifest.dest_id).map_err(|e| {
            (MigrationError::Other(format!("committed, but the container could not be let run: {e}; `ctmigrate resolve` on this host retries")), Outcome::SourceNotResumed)
        })?;
        self.step(DestinationEvent::Resumed).map_err(|e| (e, Outcome::SourceNotResumed))?;
        failpoint!("receiver-before-commit-ack").map_err(|e| (e, Outcome::SourceNotResumed))?;
        let _ = self.writer.write_frame(MessageKind::CommitAck, b"");
        let _ = self.writer.flush();
        self.control.shutdown();
        Ok(())
    }

    /// Everything is checked before the sender freezes anything.
    fn check_manifest(&self, m: &Manifest) -> Result<(container_runtime::Spec, String), (MigrationError, Outcome)> {
        validate_container_id(&m.dest_id).map_err(|e| refused(e.to_string()))?;
        if m.arch != std::env::consts::ARCH {
            return Err(refused(format!(
                "the container comes from an {} host; this host is {}",
                m.arch,
                std::env::consts::ARCH
            )));
        }
        match self.runc.exists(&m.dest_id) {
            Ok(false) => {}
            Ok(true) => {
                return Err(refused(format!(
                    "a container `{}` already exists on the destination (runtime root {}): choose another with --dest-id, or remove it",
                    m.dest_id,
                    self.opts.runtime_root.display()
                )))
            }
            Err(e) => return Err(refused(format!("cannot query the destination's runtime: {e}"))),
        }
        let bundle = self.opts.bundle_root.join(&m.dest_id);
        if bundle.exists() {
            return Err(refused(format!(
                "bundle directory {} already exists on the destination: remove it or choose another --dest-id",
                bundle.display()
            )));
        }
        let mut policy = BundlePolicy {
            cgroup_parent: self.opts.cgroup_parent.clone(),
            allowed_bind_sources: self.opts.allowed_bind_sources.clone(),
            network_namespace: None,
            poststop_hook: None,
        };
        if let Some(record) = m.network.clone().map(NetworkRecord::from) {
            record.validate().map_err(|e| refused(e.to_string()))?;
            match (&self.opts.bridge, record.is_empty()) {
                (Some(bridge), _) => container_network::check_bridge(bridge).map_err(|e| refused(e.to_string()))?,
                (None, false) => {
                    return Err(refused(format!(
                        "the container has network interfaces ({}), but this receiver has no bridge to attach them to: start `ctmigrate receive` with --bridge NAME",
                        record.interfaces.iter().map(|i| format!("{} {}", i.name, i.addresses.join(" "))).collect::<Vec<_>>().join(", ")
                    )))
                }
                (None, true) => {}
            }
            let netns = container_network::Netns::Named(DestinationNetwork::netns_name(&m.dest_id));
            if netns.exists() {
                return Err(refused(format!(
                    "network namespace {} already exists on the destination: another container uses it; choose another --dest-id",
                    netns.path().display()
                )));
            }
            let exe = std::env::current_exe().map_err(|e| refused(format!("cannot find the ctmigrate binary for the poststop hook: {e}")))?;
            policy.network_namespace = Some(netns.path());
            // When the container is deleted, runc runs this and the
            // namespace built for it goes too.
            policy.poststop_hook = Some((exe, vec!["ctmigrate".into(), "hook".into(), "remove-netns".into()]));
        }
        if m.empty_tmpfs.len() > container_runtime::tmpfs::MAX_EMPTY_TMPFS {
            return Err(refused(format!("the manifest lists {} empty tmpfs mounts (at most {})", m.empty_tmpfs.len(), container_runtime::tmpfs::MAX_EMPTY_TMPFS)));
        }
        for (i, tmpfs) in m.empty_tmpfs.iter().enumerate() {
            EmptyTmpfs::from(tmpfs.clone()).validate().map_err(refused)?;
            if m.empty_tmpfs[..i].iter().any(|t| t.mountpoint == tmpfs.mountpoint) {
                return Err(refused(format!("the manifest lists the tmpfs at {} twice", tmpfs.mountpoint)));
            }
        }
        let (spec, criu_config) =
            policy.destination_config(&m.oci_config, &m.dest_id, &bundle).map_err(|e| refused(e.to_string()))?;
        if let Some(cg) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()) {
            if let Some(existing) = existing_cgroup(&cg) {
                return Err(refused(format!(
                    "cgroup {} already exists on the destination: another container uses it; choose another --dest-id or --cgroup-parent",
                    existing.display()
                )));
            }
        }
        Ok((spec, criu_config))
    }

    /// Reads rootfs passes and rounds of images until the final round's
    /// ImagesDone, verified. Pre-dump rounds are acknowledged one by one.
    /// Returns the final round's file list.
    fn receive_state(&mut self, max_rounds: u32) -> Result<(ImagesDone, RootfsCheck), MigrationError> {
        let st = self.staging.as_ref().expect("staging exists");
        let (rootfs_dir, images_dir) = (st.bundle.join("rootfs"), st.images.clone());
        let mut tree = rootfs::Applier::new(&rootfs_dir, self.opts.unpack.clone())?;
        // The frozen pass's verification, run while the images arrive.
        let mut check: Option<RootfsCheck> = None;
        let mut round: Option<(RoundBegin, ImageSink)> = None;
        let mut last_round = 0u32;
        // The round the next one restores against: round 1 for as long as
        // each later pre-dump round folds into it.
        let mut parent_round = 1u32;
        let mut folding = true;
        let mut first_image = true;
        let since = Instant::now();
        loop {
            let frame = self.read()?;
            match frame.kind {
                MessageKind::RootfsEntry
                | MessageKind::RootfsFileData
                | MessageKind::RootfsFileEnd
                | MessageKind::RootfsDelete
                | MessageKind::RootfsEnd => {
                    if check.is_some() {
                        return Err(MigrationError::BadStream("rootfs records after the frozen pass".into()));
                    }
                    let (end, bytes) = tree.receive_pass(&mut self.reader, frame)?;
                    self.sink_bytes += bytes;
                    if end.phase == RootfsPhase::Frozen {
                        check = Some(rootfs::verify::start(&mut tree, end));
                    }
                }
                MessageKind::RoundBegin => {
                    let begin: RoundBegin = frame.json()?;
                    if round.is_some() || begin.round != last_round + 1 {
                        return Err(MigrationError::BadStream(format!("round {} out of order", begin.round)));
                    }
                    if begin.kind == RoundKind::PreDump && begin.round > max_rounds.min(crate::source::MAX_ITERATIONS) {
                        return Err(MigrationError::BadStream(format!("round {} exceeds the announced {max_rounds}", begin.round)));
                    }
                    let dir = images_dir.join(round_dir(begin.kind, begin.round));
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dir)
                        .map_err(MigrationError::io(format!("creating {}", dir.display())))?;
                    // The parent link is ours to make: CRIU follows it to
                    // the previous round's pages.
                    if begin.round > 1 {
                        let parent = format!("../{}", round_dir(RoundKind::PreDump, parent_round));
                        std::os::unix::fs::symlink(parent, dir.join("parent"))
                            .map_err(MigrationError::io("linking the parent images"))?;
                    }
                    let reserve = self.staging.as_mut().and_then(|st| st.reserve.take());
                    let sink = ImageSink::new(&dir, self.opts.max_image_files, self.opts.max_image_file).with_reserve(reserve);
                    round = Some((begin, sink));
                }
                MessageKind::ImageData => {
                    let Some((_, sink)) = round.as_mut() else {
                        return Err(MigrationError::BadStream("image data outside a round".into()));
                    };
                    self.sink_bytes += sink.write_frame(&frame)? as u64;
                    self.reader.recycle(frame);
                    self.rep.progress(Phase::Transfer, self.sink_bytes, since);
                    if std::mem::take(&mut first_image) {
                        failpoint!("receiver-during-images")?;
                    }
                }
                MessageKind::ImagesDone => {
                    let Some((begin, mut sink)) = round.take() else {
                        return Err(MigrationError::BadStream("ImagesDone outside a round".into()));
                    };
                    let done: ImagesDone = frame.json()?;
                    sink.verify(&done)?;
                    if let Some(st) = self.staging.as_mut() {
                        st.reserve = sink.take_reserve();
                    }
                    last_round = begin.round;
                    if begin.kind == RoundKind::Final {
                        let check = check.ok_or_else(|| MigrationError::BadStream("the final images came before the frozen rootfs pass".into()))?;
                        return Ok((done, check));
                    }
                    let bytes = done.files.iter().map(|f| f.size).sum();
                    failpoint!("receiver-after-round")?;
                    self.writer.write_json(MessageKind::RoundDone, &RoundDone { round: begin.round, bytes })?;
                    self.writer.flush()?;
                    // While the sender's next round runs.
                    parent_round = begin.round;
                    if begin.round > 1 && folding {
                        folding = self.fold_round(&images_dir, begin.round);
                        if folding {
                            parent_round = 1;
                        }
                    }
                }
                other => {
                    return Err(ProtocolError::UnexpectedMessage { expected: "rootfs or image data", got: other }.into())
                }
            }
        }
    }

    /// Folds pre-dump round `round` into round 1 and removes it; false (and
    /// nothing changed for the restore) if it cannot be folded.
    fn fold_round(&mut self, images_dir: &Path, round: u32) -> bool {
        let later = images_dir.join(round_dir(RoundKind::PreDump, round));
        let outcome = criu_bindings::pagemap::fold_into_base(&images_dir.join(round_dir(RoundKind::PreDump, 1)), &later);
        let (folded_bytes, kept_because) = match outcome {
            Ok(criu_bindings::pagemap::Fold::Folded { bytes }) => (Some(bytes), None),
            Ok(criu_bindings::pagemap::Fold::NotFoldable(why)) => (None, Some(why)),
            // The chain is still whole (round 1 only ever receives newer
            // copies of its own pages): CRIU will read it as it is.
            Err(e) => (None, Some(e.to_string())),
        };
        let folded = folded_bytes.is_some();
        self.rep.emit(Event::RoundFold { round, folded_bytes, kept_because });
        if folded {
            // Only memory if it stays: nothing links to it any more.
            let _ = std::fs::remove_dir_all(&later);
        }
        folded
    }
}

/// The frozen rootfs pass's verification, running.
type RootfsCheck = std::thread::JoinHandle<Result<rootfs::Verified, MigrationError>>;

/// The first hierarchy in which the cgroup `path` already exists.
fn existing_cgroup(path: &Path) -> Option<PathBuf> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    roots.into_iter().map(|r| r.join(rel)).find(|p| p.join("cgroup.procs").exists() || p.join("tasks").exists())
}

/// What one incoming migration created; removed on drop unless committed.
struct Staging {
    runc: Runc,
    dest_id: String,
    bundle: PathBuf,
    /// `work_root/recv-<id>-<pid>`, holding images/ and CRIU's logs.
    work_dir: PathBuf,
    images: PathBuf,
    work: PathBuf,
    restore_attempted: bool,
    committed: bool,
    network: Option<DestinationNetwork>,
    /// Staging memory set aside before the freeze (memory staging only).
    reserve: Option<crate::scratch::Reserve>,
    /// Memory for the restore's first read block, set aside with `reserve`.
    restore_block: Option<crate::scratch::Reserve>,
    /// The migration's admission (destination id, staging memory), given
    /// back when everything above is gone.
    admission: Option<crate::admission::Ticket>,
}

impl Staging {
    fn create(opts: &ReceiveOptions, runc: &Runc, dest_id: &str) -> Result<Self, MigrationError> {
        let bundle = opts.bundle_root.join(dest_id);
        let work_dir = opts.work_root.join(format!("recv-{dest_id}-{}", std::process::id()));
        let st = Staging {
            runc: runc.clone(),
            dest_id: dest_id.to_string(),
            images: work_dir.join("images"),
            work: work_dir.join("work"),
            bundle: bundle.clone(),
            work_dir,
            restore_attempted: false,
            committed: false,
            reserve: None,
            restore_block: None,
            network: None,
            admission: None,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&opts.bundle_root)
            .map_err(MigrationError::io(format!("creating {}", opts.bundle_root.display())))?;
        // create (not create_all): an existing bundle is never reused.
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&bundle)
            .map_err(MigrationError::io(format!("creating {}", bundle.display())))?;
        std::fs::write(bundle.join(INCOMPLETE_MARKER), std::process::id().to_string())
            .map_err(MigrationError::io("writing the staging marker"))?;
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(bundle.join("rootfs"))
            .map_err(MigrationError::io("creating the rootfs directory"))?;
        for d in [&st.images, &st.work] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(MigrationError::io(format!("creating {}", d.display())))?;
        }
        Ok(st)
    }

    /// A new tmpfs like the container's empty one, for CRIU to bind-mount
    /// in its place (the images name it external). Under the work
    /// directory, so that removing that unmounts it.
    fn mount_empty_tmpfs(&self, index: usize, tmpfs: &EmptyTmpfs) -> Result<PathBuf, MigrationError> {
        let dir = self.work_dir.join(crate::scratch::EMPTY_TMPFS_DIR).join(index.to_string());
        // CRIU's configuration file splits its lines at blanks.
        if dir.to_string_lossy().chars().any(char::is_whitespace) {
            return Err(MigrationError::Usage(format!("--work-dir {} holds a blank, which CRIU's configuration cannot name: choose another", dir.display())));
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(MigrationError::io(format!("creating {}", dir.display())))?;
        let what = format!("the container's {}", tmpfs.mountpoint);
        crate::scratch::mount_tmpfs_with(&dir, &tmpfs.options.join(","), tmpfs.read_only, &what)?;
        Ok(dir)
    }

    /// Removes the leave-stopped line from the bundle's CRIU
    /// configuration once the restore is done.
    fn drop_leave_stopped(&self) -> Result<(), MigrationError> {
        let path = self.bundle.join(container_runtime::bundle::CRIU_RESTORE_CONFIG);
        let config = std::fs::read_to_string(&path).map_err(MigrationError::io(format!("reading {}", path.display())))?;
        std::fs::write(&path, config.replace(LEAVE_STOPPED, "")).map_err(MigrationError::io(format!("writing {}", path.display())))
    }

    fn commit(mut self) {
        self.committed = true;
        let _ = std::fs::remove_file(self.bundle.join(INCOMPLETE_MARKER));
        crate::scratch::remove_work_dir(&self.work_dir);
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            if self.restore_attempted {
                crate::settle::remove_container(&self.runc, &self.dest_id);
            }
            if let Some(net) = &self.network {
                net.remove();
            }
            if self.restore_attempted {
                crate::settle::remove_cgroups_of(&self.bundle);
            }
            let _ = std::fs::remove_dir_all(&self.bundle);
            crate::scratch::remove_work_dir(&self.work_dir);
        }
        // The reserves go before the admission that counted them.
        drop((self.reserve.take(), self.restore_block.take()));
        drop(self.admission.take());
    }
}


/// Removes what receivers that died mid-migration left: uncommitted
/// bundles (and any container restored from them, since its sender has
/// rolled back) and image directories.
pub fn sweep_stale(opts: &ReceiveOptions, runc: &Runc, rep: &Reporter) {
    // First what the journal says: a committed copy is finished and let
    // run, anything before that removed.
    let journal = Journal::new(&opts.journal_dir);
    for line in crate::resolve::recover_destinations(&journal) {
        rep.warn(line);
    }
    // Bundles a journal entry still answers for are not the marker's to remove.
    let claimed: std::collections::HashSet<PathBuf> = journal
        .list()
        .into_iter()
        .flatten()
        .filter_map(|e| match e.side {
            Side::Destination { state: DestinationState::Committed | DestinationState::Running, plan } => Some(plan.bundle),
            _ => None,
        })
        .collect();
    if let Ok(rd) = std::fs::read_dir(&opts.bundle_root) {
        for e in rd.flatten() {
            let marker = e.path().join(INCOMPLETE_MARKER);
            if claimed.contains(&e.path()) {
                continue;
            }
            let Ok(pid) = std::fs::read_to_string(&marker) else { continue };
            let pid: u32 = pid.trim().parse().unwrap_or(0);
            if pid == std::process::id() || crate::journal::is_ctmigrate_process(pid) {
                continue;
            }
            let id = e.file_name().to_string_lossy().into_owned();
            rep.warn(format!("removing {}, left uncommitted by a receiver that died", e.path().display()));
            crate::settle::remove_container(runc, &id);
            let _ = DestinationNetwork::remove_for(&id);
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    if let Ok(rd) = std::fs::read_dir(&opts.work_root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("recv-") else { continue };
            let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !crate::journal::is_ctmigrate_process(pid) {
                crate::scratch::remove_work_dir(&e.path());
            }
        }
    }
}
