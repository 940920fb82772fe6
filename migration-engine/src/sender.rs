//! The source side of a migration.
//!
//! Order of work, and what a failure at each point leaves behind:
//!
//! 1. preflight: find the container, read its state, connect, handshake,
//!    send the manifest and get it accepted. A failure touches nothing.
//! 2. rootfs sync while the container runs. Still nothing touched.
//! 3. freeze the cgroup; send the rootfs delta; CRIU dumps with the tasks
//!    left in place (frozen), page images streaming as CRIU writes them;
//!    wait for the destination to restore. A failure thaws the source.
//! 4. commit: Commit → CommitAck, and only then the source is killed and
//!    deleted. A lost CommitAck leaves the outcome uncertain (exit 6).

use std::io::BufWriter;

use crate::tls::{Conn, Security};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use container_runtime::{validate_container_id, DumpPlan, EmptyTmpfs, FreezerState, Runc, RuncInternalState, RuncState};
use criu_bindings::{CriuSession, DumpOptions, ExternalMount, NotifyAction};
use migration_protocol::{
    RootfsPhase, CompressionMode, Compressor, ErrorMessage, FrameReader, FrameWriter, Hello, HelloAck, Manifest, ManifestAccepted,
    MessageKind, Ready, RoundBegin, RoundDone, RoundKind, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

use crate::error::{Failure, Outcome};
use crate::journal::{Entry, Journal, Role, Side, SourcePlan};
use crate::settle;
use migration_protocol::state::SourceEvent;
use migration_protocol::{SourceFate, SourceMachine, SourceState};
use crate::events::{Event, Phase, ResultEvent};
use crate::transport::{connect, Destination};
use crate::guard::FreezeGuard;
use crate::precopy::{Convergence, ModeRequest, RoundReport};
use crate::{images, interrupt, rootfs, MigrationError, Reporter};

/// Where CRIU finds its end of the page-server socket.
const PAGE_SERVER_FD: i32 = 4;
/// CRIU's send buffer on that socket: a few of its page pipes.
const RELAY_SOCKET_BUFFER: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct SendOptions {
    pub container: String,
    pub to: Destination,
    pub runtime_root: PathBuf,
    pub dest_id: Option<String>,
    pub compression: CompressionMode,
    pub work_root: PathBuf,
    pub runc_binary: PathBuf,
    pub criu_binary: PathBuf,
    /// Longest wait for the peer outside of restore.
    pub io_timeout: Duration,
    /// Longest wait for the destination to restore.
    pub restore_timeout: Duration,
    pub freeze_timeout: Duration,
    /// The ctmigrate binary that runs the freeze guard (see [`guard`]).
    pub guard_exe: PathBuf,
    pub mode: ModeRequest,
    /// Most pre-dump rounds (`--max-iterations`).
    pub max_iterations: u32,
    /// Frozen time pre-copy aims for (`--downtime-target`).
    pub downtime_target: Duration,
    pub security: Security,
    pub audit_log: PathBuf,
    /// Most bytes per second on the wire (`--bwlimit`).
    pub bwlimit: Option<u64>,
    /// `-o` options for ssh:// destinations.
    pub ssh_options: Vec<String>,
    /// What ssh runs on the destination.
    pub remote_command: String,
    /// Dump and restore established TCP connections (`--tcp-established`).
    pub tcp_established: bool,
    /// Where CRIU's images wait before they are sent (`--stage-images`).
    pub stage_images: crate::scratch::StageMode,
    /// This host's migration journal (`--journal-dir`).
    pub journal_dir: PathBuf,
    /// How long to keep asking a destination that did not acknowledge the
    /// Commit, the source frozen meanwhile (`--in-doubt-timeout`).
    pub in_doubt_timeout: Duration,
}

/// The source container's network namespace, when ctmigrate moves it
/// rather than CRIU: one named by a path in config.json, or one of its own
/// with interfaces besides loopback.
struct SourceNetwork {
    netns: container_network::Netns,
    record: container_network::NetworkRecord,
    /// The namespace is a named one (/run/netns) that belonged to the
    /// container: remove it once the destination owns the container.
    remove_after_migration: bool,
    locked: bool,
}

/// How a migration runs, once the mode request met the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    StopCopy,
    Precopy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::StopCopy => "stop-copy",
            Mode::Precopy => "precopy",
        }
    }
}

pub type SendReport = ResultEvent;

/// An open, handshaken connection to a receiver.
pub(crate) struct Peer {
    reader: FrameReader<Conn>,
    pub(crate) writer: FrameWriter<BufWriter<crate::transport::Throttle<Conn>>>,
    /// For timeouts and shutdown.
    control: Conn,
    identity: String,
    /// The `ssh` child for ssh:// destinations, and where its stderr goes.
    ssh: Option<(std::process::Child, tempfile::NamedTempFile)>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some((child, _)) = self.ssh.as_mut() {
            // After a commit the remote receiver exits by itself; give it a
            // moment, then stop ssh either way.
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Peer {
    pub(crate) fn flush(&mut self) -> Result<(), MigrationError> {
        self.writer.flush()?;
        Ok(())
    }

    pub(crate) fn read_with_timeout(&mut self, t: Duration) -> Result<migration_protocol::Frame, MigrationError> {
        self.control.set_read_timeout(Some(t))?;
        let frame = match self.reader.read_frame() {
            Ok(f) => f,
            // ssh says why it ended (host key, login refused, ...).
            Err(e) => return Err(self.ssh_reason().map(|r| MigrationError::Unreachable { addr: "ssh".into(), reason: r }).unwrap_or(e.into())),
        };
        if frame.kind == MessageKind::Error {
            let e: ErrorMessage = frame.json()?;
            return Err(MigrationError::Remote(e.message));
        }
        Ok(frame)
    }

    /// After a failed write, the receiver may have said why it hung up.
    /// The last line ssh wrote to stderr, once it has exited.
    fn ssh_reason(&mut self) -> Option<String> {
        let (child, stderr) = self.ssh.as_mut()?;
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(stderr.path()).ok()?;
        text.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!("ssh: {}", l.trim()))
    }

    fn reason_for_hangup(&mut self) -> Option<String> {
        let _ = self.control.set_read_timeout(Some(Duration::from_secs(2)));
        for _ in 0..64 {
            match self.reader.read_frame() {
                Ok(f) if f.kind == MessageKind::Error => return f.json::<ErrorMessage>().ok().map(|e| e.message),
                Ok(f) if f.kind == MessageKind::Abort => {
                    return f.json::<migration_protocol::Abort>().ok().map(|a| a.reason)
                }
                Ok(_) => continue,
                // A receiver that refused a TLS record said why in its alert.
                Err(migration_protocol::ProtocolError::Io(e)) => return crate::tls::peer_alert(&e),
                Err(_) => return None,
            }
        }
        None
    }
}

/// What preflight found.
struct Prepared {
    /// Names the migration in both journals.
    migration_id: String,
    state: RuncState,
    plan: DumpPlan,
    dest_id: String,
    peer: Peer,
    mode: Mode,
    mode_reason: Option<String>,
    network: Option<SourceNetwork>,
    /// Who moves the network namespace, and why (for the result).
    network_handling: Option<String>,
    /// Resident memory of the container at preflight.
    memory_bytes: u64,
    /// The container's mount points: what they cover in the rootfs
    /// directory is hidden from it, and not sent.
    hidden_mounts: std::collections::BTreeSet<PathBuf>,
}

/// Migrates one container. On failure, the [`Failure`] says what became of
/// the source; the result event is emitted either way.
pub fn send(opts: &SendOptions, rep: &Reporter) -> Result<SendReport, Failure> {
    let started = Instant::now();
    let dest_id = opts.dest_id.clone().unwrap_or_else(|| opts.container.clone());
    let mut result = ResultEvent {
        ok: false,
        role: "sender",
        container: opts.container.clone(),
        dest_id: dest_id.clone(),
        mode: "stop-copy".into(),
        ..Default::default()
    };
    let mut peer = format!("{}", opts.to);
    // What killed senders left open on this host is settled first.
    let journal = Journal::new(&opts.journal_dir);
    for line in crate::resolve::recover_sources(&journal, opts.io_timeout, &|m: &str| rep.warn(m)) {
        rep.warn(format!("settling a migration a previous sender left open: {line}"));
    }
    let outcome = match crate::resolve::open_migration_of(&journal, &opts.container) {
        Some(open) => Err(Failure {
            error: MigrationError::Preflight(format!(
                "migration {} of `{}` is not settled ({}): `ctmigrate resolve {}` first",
                open.id,
                open.container,
                open.state_name(),
                open.id
            )),
            outcome: Outcome::NothingTouched,
        }),
        None => Ok(()),
    };
    let outcome = outcome.and_then(|()| match preflight(opts, &dest_id, rep) {
        Err(error) => Err(Failure { error, outcome: Outcome::NothingTouched }),
        Ok(prepared) => {
            result.mode = prepared.mode.name().into();
            result.mode_reason = prepared.mode_reason.clone();
            result.network = prepared.network_handling.clone();
            peer = prepared.peer.identity.clone();
            result.migration_id = Some(prepared.migration_id.clone());
            Migration::new(opts, prepared, rep).run(&mut result)
        }
    });
    result.total_ms = started.elapsed().as_millis() as u64;
    match &outcome {
        Ok(()) => {
            result.ok = true;
            result.source_state = Some("migrated".into());
        }
        Err(f) => {
            result.error = Some(f.error.to_string());
            result.exit_code = Some(f.outcome.exit_code());
            result.source_state = Some(
                match f.outcome {
                    Outcome::NothingTouched => "untouched",
                    Outcome::SourceResumed => "running",
                    Outcome::SourceNotResumed => "not-resumed",
                    Outcome::Uncertain => "in-doubt",
                }
                .into(),
            );
        }
    }
    if let Err(e) = crate::audit::record(&opts.audit_log, &peer, &result) {
        rep.warn(format!("cannot write the audit log {}: {e}", opts.audit_log.display()));
    }
    result.usage = Some(crate::events::ResourceUsage::measure());
    rep.emit(Event::Result(result.clone()));
    outcome.map(|()| result)
}

fn preflight(opts: &SendOptions, dest_id: &str, rep: &Reporter) -> Result<Prepared, MigrationError> {
    rep.phase(Phase::Preflight);
    validate_container_id(&opts.container)?;
    validate_container_id(dest_id)?;
    let runc = Runc::new(&opts.runc_binary, &opts.runtime_root);
    let state = runc.running(&opts.container)?;
    let internal: RuncInternalState = runc.internal_state(&opts.container)?;
    let mut plan = DumpPlan::for_container(&internal)?;
    let (network, network_handling) = source_network(&mut plan, &internal, rep)?;
    // Sent as the receiver's staging hint, and used for our own staging.
    let memory_bytes = container_memory_bytes(&plan);
    match plan.freezer.state()? {
        FreezerState::Thawed => {}
        other => {
            return Err(MigrationError::Preflight(format!(
                "container `{}` is {other:?} (paused?): resume it with `runc resume` first",
                opts.container
            )))
        }
    }
    check_rlimits_readable(opts, &plan)?;
    let config_path = state.bundle.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config_path).map_err(MigrationError::io(format!("reading {}", config_path.display())))?,
    )
    .map_err(|e| MigrationError::Preflight(format!("{}: {e}", config_path.display())))?;
    let criu_version = criu_bindings::version(&opts.criu_binary)?;
    let (mode, mode_reason) = resolve_mode(opts)?;
    let hidden_mounts = rootfs::scan::hidden_mount_points(state.pid)?;
    if let Some(reason) = &mode_reason {
        rep.warn(reason.clone());
    }

    rep.emit(Event::Start {
        role: "sender",
        container: opts.container.clone(),
        dest_id: dest_id.to_string(),
        peer: opts.to.to_string(),
        mode: mode.name().into(),
        mode_reason: mode_reason.clone(),
    });
    rep.phase(Phase::Connect);
    let link = PeerLink {
        to: &opts.to,
        security: &opts.security,
        io_timeout: opts.io_timeout,
        bwlimit: opts.bwlimit,
        ssh_options: &opts.ssh_options,
        remote_command: &opts.remote_command,
    };
    let (mut peer, _ack) = connect_peer(&link, Some(rep), true)?;
    let uts = nix::sys::utsname::uname().map_err(|e| MigrationError::Other(e.to_string()))?;
    let migration_id = crate::journal::new_migration_id();
    let manifest = Manifest {
        migration_id: migration_id.clone(),
        container_id: opts.container.clone(),
        dest_id: dest_id.to_string(),
        oci_config: config,
        criu_version: criu_version.to_string(),
        kernel: uts.release().to_string_lossy().into_owned(),
        arch: std::env::consts::ARCH.to_string(),
        cgroup_version: plan.freezer.version.as_u8(),
        mode: mode.name().into(),
        max_rounds: if mode == Mode::Precopy { opts.max_iterations } else { 0 },
        tcp_established: opts.tcp_established,
        network: network.as_ref().map(|n| n.record.clone().into()),
        memory_bytes,
        empty_tmpfs: plan.empty_tmpfs.iter().cloned().map(Into::into).collect(),
        source_host: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    peer.writer.write_json(MessageKind::Manifest, &manifest)?;
    peer.flush()?;
    match peer.read_with_timeout(opts.io_timeout) {
        Ok(f) => {
            let _accepted: ManifestAccepted = f.expect(MessageKind::ManifestAccepted, "ManifestAccepted")?.json()?;
        }
        Err(MigrationError::Remote(reason)) => return Err(MigrationError::Refused(format!("{} says: {reason}", opts.to))),
        Err(e) => return Err(e),
    }
    Ok(Prepared { migration_id, state, plan, dest_id: dest_id.to_string(), peer, mode, mode_reason, network, network_handling, memory_bytes, hidden_mounts })
}

/// How to reach a receiver: what `send` was given.
pub(crate) struct PeerLink<'a> {
    pub to: &'a Destination,
    pub security: &'a Security,
    pub io_timeout: Duration,
    pub bwlimit: Option<u64>,
    pub ssh_options: &'a [String],
    pub remote_command: &'a str,
}

/// Connects (TCP with TLS, or ssh), says Hello and checks the version the
/// receiver chose. `register_interrupt`: a signal cuts this connection.
pub(crate) fn connect_peer(link: &PeerLink<'_>, rep: Option<&Reporter>, register_interrupt: bool) -> Result<(Peer, HelloAck), MigrationError> {
    // TLS material is read before connecting: a missing certificate fails
    // here, with nothing touched.
    let tls = match link.security {
        _ if matches!(link.to, crate::transport::Destination::Ssh { .. }) => None, // ssh authenticates and encrypts
        Security::Tls(dir) => Some(crate::tls::client_config(dir)?),
        Security::Insecure => {
            if let Some(rep) = rep {
                rep.warn("--insecure: the migration stream is neither authenticated nor encrypted");
            }
            None
        }
    };
    // One deadline, --timeout, for connect, the TLS handshake and the
    // HelloAck: a receiver that accepts and then says nothing (busy,
    // stalled) cannot hold us longer. A watchdog keeps it whole, however
    // the receiver trickles its bytes.
    let handshake_deadline = Instant::now() + link.io_timeout;
    let left = || handshake_deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let watchdog = crate::listener::Watchdog::start();
    let mut armed = None;
    let mut peer = match link.to {
        crate::transport::Destination::Tcp { host, .. } => {
            let stream = connect(link.to, link.io_timeout)?;
            if register_interrupt {
                interrupt::register(&stream);
            }
            armed = Some(watchdog.arm(&stream, handshake_deadline).map_err(MigrationError::io("socket"))?);
            stream.set_read_timeout(Some(left())).map_err(MigrationError::io("socket"))?;
            stream.set_write_timeout(Some(left())).map_err(MigrationError::io("socket"))?;
            let conn = match tls {
                Some(cfg) => Conn::client(stream, cfg, host)
                    .map_err(|e| crate::transport::no_answer(e, link.to, link.io_timeout, Instant::now() >= handshake_deadline))?,
                None => Conn::plain(stream)?,
            };
            conn.set_write_timeout(Some(link.io_timeout))?;
            Peer {
                identity: conn.peer_identity(),
                reader: FrameReader::new(conn.handle()?),
                control: conn.handle()?,
                writer: FrameWriter::new(BufWriter::with_capacity(256 * 1024, crate::transport::Throttle::new(conn, link.bwlimit))),
                ssh: None,
            }
        }
        ssh_dest @ crate::transport::Destination::Ssh { .. } => {
            // ssh's stderr, for the reason it gives when it fails.
            let stderr = tempfile::NamedTempFile::new().map_err(MigrationError::io("creating ssh's stderr file"))?;
            let err_file = stderr.reopen().map_err(MigrationError::io("opening ssh's stderr file"))?;
            let mut child = crate::transport::spawn_ssh(ssh_dest, link.ssh_options, link.remote_command, err_file)?;
            let pid = child.id() as i32;
            if register_interrupt {
                interrupt::register_cut(move || {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                });
            }
            let read: std::fs::File = std::os::fd::OwnedFd::from(child.stdout.take().expect("piped")).into();
            let write: std::fs::File = std::os::fd::OwnedFd::from(child.stdin.take().expect("piped")).into();
            let conn = Conn::pipes(read, write);
            Peer {
                identity: ssh_dest.to_string(),
                reader: FrameReader::new(conn.handle()?),
                control: conn.handle()?,
                writer: FrameWriter::new(BufWriter::with_capacity(256 * 1024, crate::transport::Throttle::new(conn, link.bwlimit))),
                ssh: Some((child, stderr)),
            }
        }
    };
    let hello = Hello { min_version: PROTOCOL_VERSION_MIN, max_version: PROTOCOL_VERSION_MAX, software: crate::software() };
    let ack: HelloAck = (|| -> Result<HelloAck, MigrationError> {
        peer.writer.write_json(MessageKind::Hello, &hello)?;
        peer.flush()?;
        let wait = if armed.is_some() { left() } else { link.io_timeout };
        let ack = match peer.read_with_timeout(wait) {
            // The receiver refused before the manifest (busy, say).
            Err(MigrationError::Remote(reason)) => return Err(MigrationError::Refused(format!("{} says: {reason}", link.to))),
            other => other?,
        };
        Ok(ack.expect(MessageKind::HelloAck, "HelloAck")?.json()?)
    })()
    .map_err(|e| crate::transport::no_answer(e, link.to, link.io_timeout, armed.is_some() && Instant::now() >= handshake_deadline))?;
    if let Some(armed) = armed.take() {
        if !armed.disarm() {
            return Err(crate::transport::no_answer(MigrationError::Other("handshake deadline".into()), link.to, link.io_timeout, true));
        }
    }
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&ack.version) {
        return Err(MigrationError::Preflight(format!(
            "the receiver ({}) chose protocol version {}, which this build does not speak",
            ack.software, ack.version
        )));
    }
    Ok((peer, ack))
}

/// CRIU reads every task's resource limits with prlimit(), which for a
/// task that is not all root needs CAP_SYS_RESOURCE. Without it, only a
/// CRIU with ctmigrate's rlimit patch can dump such a task: refuse now,
/// before anything is frozen, naming the task. The binary's sha256 is
/// taken only when it matters (no capability, a non-root task).
fn check_rlimits_readable(opts: &SendOptions, plan: &DumpPlan) -> Result<(), MigrationError> {
    use crate::rlimit_support::{self as rl, RlimitSupport, TaskCreds};
    if rl::has_cap_sys_resource() {
        return Ok(());
    }
    let tasks: Vec<TaskCreds> = plan.freezer.pids().into_iter().filter_map(TaskCreds::of).collect();
    if !tasks.iter().any(TaskCreds::needs_cap_sys_resource) {
        return Ok(());
    }
    let support =
        RlimitSupport { cap_sys_resource: false, patch: rl::patch_status(&opts.criu_binary, Path::new(rl::DEFAULT_MARKER)) };
    match rl::refusal(&support, &tasks) {
        Some(reason) => Err(MigrationError::Preflight(reason)),
        None => Ok(()),
    }
}

/// Resident memory of the container's processes: what its images will
/// roughly hold.
fn container_memory_bytes(plan: &DumpPlan) -> u64 {
    plan.freezer
        .pids()
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
            kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .sum::<u64>()
        * 1024
}

/// Decides who moves the container's network namespace: nobody for the
/// host's; otherwise ctmigrate, as an external namespace of the dump that
/// the receiver rebuilds from a record. CRIU is never left to do it: runc
/// restores with CRIU's `empty_ns` for the network, which would bring the
/// container back in a bare namespace with loopback down and nothing of
/// what CRIU saved. A loopback-only namespace of the container's own is
/// made anew (loopback up); what it held beyond a new one's (an address, a
/// route, a firewall rule, a sysctl) is not carried, and the second value,
/// the handling shown in the result, names it.
fn source_network(
    plan: &mut DumpPlan,
    internal: &RuncInternalState,
    rep: &Reporter,
) -> Result<(Option<SourceNetwork>, Option<String>), MigrationError> {
    use container_network::Netns;
    let netns = match &plan.netns_path {
        Some(path) => Netns::Path(path.clone()),
        None if internal.config.namespaces.iter().any(|n| n.kind == "NEWNET") => Netns::Process(plan.pid),
        None => return Ok((None, None)), // the host's namespace: nothing moves
    };
    let record = container_network::record::record(&netns)
        .map_err(|e| MigrationError::Preflight(format!("cannot read the container's network: {e}")))?;
    record.validate().map_err(|e| MigrationError::Preflight(format!("the container's network cannot be moved: {e}")))?;
    let handling = if !record.is_empty() {
        format!("rebuilt by ctmigrate: {} interface(s)", record.interfaces.len())
    } else if plan.netns_path.is_none() {
        match not_carried_of_loopback_namespace(&netns) {
            None => "made anew by ctmigrate: loopback only, as new".to_string(),
            Some(lost) => {
                rep.warn(format!(
                    "the container's network namespace differs from a new one in {lost}: the destination's is made anew, without that; set it up again there (or from a runc hook)"
                ));
                format!("made anew by ctmigrate: loopback only; not carried: {lost}")
            }
        }
    } else {
        "rebuilt by ctmigrate: loopback only".to_string()
    };
    if plan.netns_path.is_none() {
        plan.external_namespaces.push(format!("net[{}]:extRootNetNS", netns.inode().map_err(|e| MigrationError::Preflight(e.to_string()))?));
    }
    let remove_after_migration = matches!(&netns, Netns::Path(_)) && netns.name().is_some();
    Ok((Some(SourceNetwork { netns, record, remove_after_migration, locked: false }), Some(handling)))
}

/// What a container's loopback-only namespace holds that a new one does
/// not (so the destination's will lack it), or `None` when it is as new.
fn not_carried_of_loopback_namespace(netns: &container_network::Netns) -> Option<String> {
    use container_network::pristine::NetnsSnapshot;
    match (NetnsSnapshot::of(netns), NetnsSnapshot::of_new_namespace()) {
        (Ok(container), Ok(new)) => {
            let differ = container.differences(&new);
            (!differ.is_empty()).then(|| differ.join(", "))
        }
        (Err(e), _) | (_, Err(e)) => Some(format!("unknown (cannot compare it with a new namespace: {e})")),
    }
}

/// Largest `--max-iterations` accepted (the receiver refuses more rounds).
pub const MAX_ITERATIONS: u32 = 32;

/// `auto` becomes pre-copy where the kernel tracks dirty memory and
/// stop-copy (with the reason) where it does not; `precopy` on such a
/// kernel is refused before anything is touched.
fn resolve_mode(opts: &SendOptions) -> Result<(Mode, Option<String>), MigrationError> {
    if opts.mode == ModeRequest::StopCopy {
        return Ok((Mode::StopCopy, None));
    }
    if !(1..=MAX_ITERATIONS).contains(&opts.max_iterations) {
        return Err(MigrationError::Usage(format!(
            "--max-iterations must be from 1 to {MAX_ITERATIONS} (got {})",
            opts.max_iterations
        )));
    }
    let soft_dirty = criu_bindings::feature_check(&opts.criu_binary)?.mem_track;
    match (opts.mode, soft_dirty) {
        (_, true) => Ok((Mode::Precopy, None)),
        (ModeRequest::Precopy, false) => Err(MigrationError::Preflight(
            "pre-copy needs soft-dirty memory tracking, which this kernel lacks: boot a kernel built with \
             CONFIG_MEM_SOFT_DIRTY=y, or use --mode stop-copy"
                .into(),
        )),
        (_, false) => Ok((
            Mode::StopCopy,
            Some("stop-copy: this kernel has no soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY), so pre-copy is impossible".into()),
        )),
    }
}

/// A migration past preflight.
struct Migration<'a> {
    opts: &'a SendOptions,
    p: Prepared,
    rep: &'a Reporter,
    compressor: Compressor,
    work_dir: PathBuf,
    /// Where the migration stands; decides what a failure does.
    machine: SourceMachine,
    /// This migration's record in the journal (see [`crate::journal`]).
    entry: Entry,
    journal: Journal,
    guard: Option<FreezeGuard>,
    /// Staging memory set aside before the freeze, given to CRIU's first dump.
    reserve: Option<crate::scratch::Reserve>,
    /// Mount points of the empty tmpfs left out of the final dump.
    tmpfs_made_anew: Vec<String>,
    /// The rootfs as sent so far, and what changed since.
    tree: rootfs::TreeSender,
}

impl<'a> Migration<'a> {
    fn new(opts: &'a SendOptions, mut p: Prepared, rep: &'a Reporter) -> Self {
        let work_dir = opts.work_root.join(format!("send-{}-{}", opts.container, std::process::id()));
        let tree = rootfs::TreeSender::new(&p.state.rootfs, std::mem::take(&mut p.hidden_mounts));
        let plan = SourcePlan {
            runtime_root: opts.runtime_root.clone(),
            runc_binary: opts.runc_binary.clone(),
            freezer_path: p.plan.freezer.path.clone(),
            cgroup_version: p.plan.freezer.version.as_u8(),
            init_pid: p.state.pid,
            netns: p.network.as_ref().map(|n| n.netns.path()),
            network: p.network.as_ref().map(|n| n.record.clone()),
            remove_netns: p.network.as_ref().map(|n| n.remove_after_migration).unwrap_or(false),
            destination: opts.to.to_string(),
            tls_dir: match &opts.security {
                Security::Tls(dir) => Some(dir.clone()),
                Security::Insecure => None,
            },
            ssh_options: opts.ssh_options.clone(),
            remote_command: opts.remote_command.clone(),
            io_timeout_ms: opts.io_timeout.as_millis() as u64,
            in_doubt_timeout_ms: opts.in_doubt_timeout.as_millis() as u64,
        };
        let entry = Entry::new(&p.migration_id, &opts.container, &p.dest_id, &p.peer.identity, Side::Source { state: SourceState::Syncing, plan });
        let mut machine = SourceMachine::new();
        for step in [SourceEvent::HelloAck, SourceEvent::ManifestAccepted] {
            machine.on(step).expect("preflight ends with the manifest accepted");
        }
        Self {
            opts,
            p,
            rep,
            compressor: Compressor::new(opts.compression),
            work_dir,
            machine,
            entry,
            journal: Journal::new(&opts.journal_dir),
            guard: None,
            reserve: None,
            tmpfs_made_anew: Vec::new(),
            tree,
        }
    }

    fn plan(&self) -> &SourcePlan {
        match &self.entry.side {
            Side::Source { plan, .. } => plan,
            Side::Destination { .. } => unreachable!("a sender's entry is a source entry"),
        }
    }

    /// Moves the machine on, and journals the states that matter to a
    /// process settling the migration after this one.
    fn step(&mut self, event: SourceEvent) -> Result<(), MigrationError> {
        let state = self.machine.on(event).map_err(|e| MigrationError::Other(format!("internal: {e}")))?;
        if journalled(state) {
            self.entry.set_source_state(state);
            self.journal.write(&self.entry).map_err(|e| MigrationError::Other(e.to_string()))?;
        }
        Ok(())
    }

    /// The failure of the step under way, handled as the state says:
    /// nothing to undo before the freeze, a thaw up to the Commit, and
    /// after it the destination's word.
    fn fail(&mut self, error: MigrationError) -> Failure {
        use migration_protocol::state::SourceRecovery;
        match self.machine.on_failure() {
            SourceRecovery::NothingToUndo => {
                self.tell_receiver_abort(&error);
                let _ = self.step(SourceEvent::Failed);
            }
            SourceRecovery::Thaw => return self.rollback(error),
            SourceRecovery::AskPeer => return self.settle_in_doubt(Some(error)).err().unwrap_or_else(|| Failure { error: MigrationError::Other("migrated after a failure".into()), outcome: Outcome::NothingTouched }),
            SourceRecovery::FinishRemoval => {
                self.destroy_source();
                let _ = self.step(SourceEvent::SourceRemoved);
            }
            SourceRecovery::None => {}
        }
        let outcome = self.machine.fate().map(Outcome::from).unwrap_or(Outcome::SourceNotResumed);
        Failure { error, outcome }
    }

    fn run(mut self, result: &mut ResultEvent) -> Result<(), Failure> {
        let mut outcome = self.run_inner(result);
        if let Some(guard) = self.guard.take() {
            guard.resolved();
        }
        interrupt::unregister();
        if let Err(f) = &mut outcome {
            if interrupt::interrupted() {
                f.error = MigrationError::Other(format!("interrupted by a signal ({})", f.error));
            }
        }
        result.bytes_sent = self.p.peer.writer.wire_bytes + self.p.peer.reader.wire_bytes;
        result.bytes_raw = self.p.peer.writer.raw_bytes;
        // Images go, success or failure; a failure's logs are kept.
        if let Err(f) = &mut outcome {
            let failed = crate::failure_logs::dir_for(&self.opts.audit_log);
            if let Some(kept) = crate::failure_logs::keep(&self.work_dir, &failed, "sender", &self.opts.container) {
                f.error = MigrationError::Other(crate::failure_logs::point_at_kept(&f.error.to_string(), &self.work_dir, &kept));
            }
        }
        crate::scratch::remove_work_dir(&self.work_dir);
        outcome
    }

    fn run_inner(&mut self, result: &mut ResultEvent) -> Result<(), Failure> {
        if let Err(e) = self.journal.write(&self.entry) {
            return Err(self.fail(MigrationError::Other(e.to_string())));
        }
        // Initial rootfs sync, container running.
        self.rep.phase(Phase::RootfsSync);
        let since = Instant::now();
        let mut sent = 0u64;
        let rep = self.rep;
        let initial = self.tree.initial_pass(&mut self.p.peer.writer, &mut self.compressor, &mut |n| {
            sent += n;
            rep.progress(Phase::RootfsSync, sent, since);
        });
        let initial = match initial {
            Ok(i) => i,
            Err(e) => {
                let e = self.explain_send_error(e);
                return Err(self.fail(e));
            }
        };
        result.rootfs = Some(crate::events::RootfsReport {
            initial_entries: Some(initial.entries),
            initial_file_bytes: Some(initial.file_bytes),
            ..Default::default()
        });
        if let Err(e) = self.prepare_work_dir() {
            return Err(self.fail(e));
        }
        // Pre-copy rounds, container running.
        if self.p.mode == Mode::Precopy {
            if let Err(e) = self.precopy(result) {
                let e = self.explain_send_error(e);
                return Err(self.fail(e));
            }
        }
        // What changed during the initial pass goes now, so that little is
        // left for the frozen one.
        self.rep.phase(Phase::RootfsDelta);
        if let Err(e) = self.tree.delta_pass(&mut self.p.peer.writer, &mut self.compressor, RootfsPhase::Delta) {
            let e = self.explain_send_error(e);
            return Err(self.fail(e));
        }

        // Freeze: from here on, every failure thaws (until the Commit),
        // and the guard acts if this process dies.
        match FreezeGuard::spawn(&self.opts.guard_exe, &self.p.plan.freezer, &self.work_dir, &self.journal.path_of(Role::Source, &self.entry.id)) {
            Ok(g) => {
                // While the guard lives, nothing else acts on the migration
                // (journalled now, before the frozen window).
                self.entry.helper_pid = Some(g.pid());
                self.guard = Some(g);
                if let Err(e) = self.journal.write(&self.entry) {
                    return Err(self.fail(MigrationError::Other(e.to_string())));
                }
            }
            Err(e) => return Err(self.fail(e)),
        }
        self.rep.phase(Phase::Freeze);
        // Lock before freezing: a frozen container's sockets would still
        // take connections and data that the dump would not carry.
        if let Err(e) = self.lock_network() {
            self.unlock_network();
            return Err(self.fail(e));
        }
        if let Err(e) = self.p.plan.freezer.freeze(self.opts.freeze_timeout) {
            self.unlock_network();
            return Err(self.fail(e.into()));
        }
        let frozen_at = Instant::now();
        if let Err(e) = self.step(SourceEvent::Froze) {
            return Err(self.fail(e));
        }
        if let Err(e) = self.frozen_phase(result) {
            return Err(self.fail(e));
        }

        // Commit: journalled first, so that whoever settles the migration
        // after this process knows the destination may run it.
        let commit_started = Instant::now();
        self.rep.phase(Phase::Commit);
        if let Err(e) = failpoint!("sender-before-commit") {
            return Err(self.fail(e));
        }
        if let Err(e) = self.step(SourceEvent::CommitSent) {
            return Err(self.fail(e));
        }
        if let Some(g) = self.guard.as_mut() {
            g.commit_sent();
        }
        let commit = (|| -> Result<(), MigrationError> {
            failpoint!("sender-after-commit-journalled")?;
            self.p.peer.writer.write_frame(MessageKind::Commit, b"")?;
            self.p.peer.flush()?;
            failpoint!("sender-after-commit")?;
            self.p.peer.read_with_timeout(self.opts.io_timeout)?.expect(MessageKind::CommitAck, "CommitAck")?;
            Ok(())
        })();
        match commit {
            Ok(()) => {
                if let Some(phases) = result.frozen_phases.as_mut() {
                    phases.commit_ms = commit_started.elapsed().as_millis() as u64;
                }
                if let Some(g) = self.guard.as_mut() {
                    g.committed();
                }
                if let Err(e) = self.step(SourceEvent::Running) {
                    self.rep.warn(format!("migrated, but {e}"));
                }
            }
            Err(e) => {
                self.rep.warn(format!("no commit acknowledgement from the destination ({e}); the source stays frozen until the destination says what it did"));
                self.settle_in_doubt(None)?;
                result.frozen_ms = Some(frozen_at.elapsed().as_millis() as u64);
                return Ok(());
            }
        }
        result.frozen_ms = Some(frozen_at.elapsed().as_millis() as u64);

        // The destination runs the container: remove the source.
        self.rep.phase(Phase::Cleanup);
        self.destroy_source();
        if let Err(e) = self.step(SourceEvent::SourceRemoved) {
            self.rep.warn(format!("migrated, but {e}"));
        }
        Ok(())
    }

    /// After a Commit that got no answer: asks the destination until it
    /// says, for `--in-doubt-timeout` at most. Ok when it committed (the
    /// source is then removed).
    fn settle_in_doubt(&mut self, cause: Option<MigrationError>) -> Result<(), Failure> {
        self.p.peer.control.shutdown();
        let limits = crate::resolve::AskLimits { io: self.opts.io_timeout, total: self.opts.in_doubt_timeout };
        let rep = self.rep;
        let (fate, last) = crate::resolve::settle_source(&self.journal, &mut self.entry, limits, &|m: &str| rep.warn(m));
        // The machine follows the journal that settle_source kept.
        if let Side::Source { state, .. } = &self.entry.side {
            self.machine = SourceMachine::at(*state);
        }
        let cause = cause.map(|c| format!("{c}; ")).unwrap_or_default();
        match fate {
            SourceFate::Migrated => {
                self.rep.warn(format!("{cause}migration {} settled after a lost acknowledgement: {last}", self.entry.id));
                if let Some(g) = self.guard.take() {
                    g.resolved();
                }
                Ok(())
            }
            SourceFate::InDoubt => {
                // Leave the source frozen: the guard must not thaw it.
                if let Some(g) = self.guard.take() {
                    g.resolved();
                }
                Err(Failure { error: MigrationError::Other(format!("{cause}{}", crate::resolve::in_doubt_message(&self.entry, &last))), outcome: Outcome::Uncertain })
            }
            other => Err(Failure {
                error: MigrationError::Other(format!("{cause}the commit did not complete: {last}")),
                outcome: Outcome::from(other),
            }),
        }
    }

    fn prepare_work_dir(&mut self) -> Result<(), MigrationError> {
        use std::os::unix::fs::DirBuilderExt;
        let images = self.work_dir.join("images");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&images)
            .map_err(MigrationError::io(format!("creating {}", images.display())))?;
        if let Some(size) = crate::scratch::memory_stage_size(self.opts.stage_images, self.p.memory_bytes) {
            crate::scratch::mount_tmpfs(&images, size)?;
            // Only pre-copy rounds write pages here; a stop-copy dump's
            // are relayed (see criu_round).
            if self.p.mode == Mode::Precopy {
                self.reserve = Some(crate::scratch::Reserve::create(&images, self.p.memory_bytes)?);
            }
        }
        Ok(())
    }

    /// Pre-dump rounds until the convergence rule says stop, each followed
    /// by the rootfs's changes.
    fn precopy(&mut self, result: &mut ResultEvent) -> Result<(), MigrationError> {
        self.rep.phase(Phase::Precopy);
        let rule = Convergence {
            downtime_target_ms: self.opts.downtime_target.as_millis() as u64,
            max_iterations: self.opts.max_iterations,
        };
        let mut rounds: Vec<RoundReport> = Vec::new();
        for round in 1..=self.opts.max_iterations {
            let started = Instant::now();
            let sizes = self.criu_round(RoundKind::PreDump, round)?;
            result.image_bytes += sizes.images;
            let bytes = sizes.pages;
            // Keep the destination's rootfs close, so the frozen delta is small.
            self.tree.delta_pass(&mut self.p.peer.writer, &mut self.compressor, RootfsPhase::Delta)?;
            self.p.peer.flush()?;
            let done: RoundDone = self.p.peer.read_with_timeout(self.opts.io_timeout)?.expect(MessageKind::RoundDone, "RoundDone")?.json()?;
            if done.round != round || done.bytes < bytes {
                return Err(MigrationError::Other(format!(
                    "the receiver acknowledged round {} with {} bytes; round {round} sent {bytes}",
                    done.round, done.bytes
                )));
            }
            self.step(SourceEvent::RoundDone(round))?;
            let report = RoundReport::new(round, "pre-dump", bytes, started.elapsed(), &rounds);
            self.rep.emit(Event::Round(report.clone()));
            rounds.push(report);
            failpoint!("sender-after-round")?;
            if let Some(reason) = rule.stop_after(&rounds) {
                self.rep.emit(Event::PrecopyStop { rounds: round, reason, detail: reason.describe() });
                result.stop_reason = Some(reason);
                break;
            }
        }
        result.rounds = rounds;
        Ok(())
    }

    /// One CRIU run (a pre-dump round, or the final dump) into its own
    /// images directory, streamed as CRIU writes.
    fn criu_round(&mut self, kind: RoundKind, round: u32) -> Result<images::RoundBytes, MigrationError> {
        use std::os::unix::fs::DirBuilderExt;
        let images = self.work_dir.join("images");
        let dir = images.join(round_dir(kind, round));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(MigrationError::io(format!("creating {}", dir.display())))?;
        let parent = (round > 1).then(|| format!("../{}", round_dir(RoundKind::PreDump, round - 1)));
        // CRIU's writes reuse the memory the reserve held (sent pages are
        // punched out after that, so later writes reuse those).
        self.reserve = None;
        self.p.peer.writer.write_json(MessageKind::RoundBegin, &RoundBegin { round, kind })?;
        let plan = &self.p.plan;
        let mut dump = DumpOptions {
            images_dir: dir.clone(),
            work_dir: Some(self.work_dir.clone()),
            log_file: format!("{}.log", round_dir(kind, round)),
            pid: plan.pid,
            root: Some(plan.root.clone()),
            leave_running: true,
            manage_cgroups: true,
            freeze_cgroup: Some(plan.freezer.path.clone()),
            external: plan.external_namespaces.clone(),
            file_locks: true,
            track_mem: self.p.mode == Mode::Precopy,
            parent_images: parent.clone(),
            ..Default::default()
        };
        // A dump with no parent sends its pages over CRIU's page-server
        // socket to this process, which relays them: they are never
        // written to this host's images directory and read back. Rounds
        // with a parent keep files (CRIU checks the parent's images there).
        let relay_pages = kind == RoundKind::Final && parent.is_none();
        match kind {
            RoundKind::PreDump => dump.pre_dump = true,
            RoundKind::Final => {
                // Mounts, stdio and connections matter only to the dump
                // that is restored.
                dump.ext_mounts = plan.ext_mounts.clone();
                // Empty now, with every task frozen: the receiver's new
                // tmpfs is the same thing, and CRIU runs no tar for it.
                for (index, tmpfs) in plan.empty_tmpfs.iter().enumerate() {
                    if tmpfs.still_empty(plan.pid) {
                        dump.ext_mounts.push(ExternalMount { key: tmpfs.mountpoint.clone(), val: EmptyTmpfs::external_key(index) });
                        self.tmpfs_made_anew.push(tmpfs.mountpoint.clone());
                    }
                }
                dump.tcp_established = self.opts.tcp_established;
                // nftables: CRIU keeps its lock in one table of its own and
                // deletes it whole; the iptables method leaves empty
                // filter tables behind in the container's namespace.
                dump.network_lock = Some(criu_bindings::NetworkLock::Nftables);
                std::fs::write(dir.join("descriptors.json"), &plan.descriptors_json)
                    .map_err(MigrationError::io("writing descriptors.json"))?;
            }
        }
        self.dump_and_stream(dump, relay_pages)
    }

    /// Rootfs delta, dump and transfer, restore on the destination.
    fn frozen_phase(&mut self, result: &mut ResultEvent) -> Result<(), MigrationError> {
        failpoint!("sender-after-freeze")?;
        #[cfg(feature = "failpoints")]
        if corrupt_at!("sender-corrupt-wire") {
            self.p.peer.control.corrupt_next_record();
        }
        let phase_started = Instant::now();
        self.rep.phase(Phase::RootfsDelta);
        let frozen = self
            .tree
            .delta_pass(&mut self.p.peer.writer, &mut self.compressor, RootfsPhase::Frozen)
            .map_err(|e| self.explain_send_error(e))?;
        if let Some(r) = result.rootfs.as_mut() {
            r.digest = frozen.tree_digest.clone().unwrap_or_default();
            r.entries = frozen.tree_entries;
            r.frozen_entries = Some(frozen.entries);
            r.frozen_deleted = Some(frozen.deleted);
            r.frozen_tracking = Some(frozen.full_walk.clone().map(|why| format!("full walk: {why}")).unwrap_or_else(|| "inotify".into()));
        }
        let mut phases = crate::events::FrozenPhases { rootfs_delta_ms: phase_started.elapsed().as_millis() as u64, ..Default::default() };

        let phase_started = Instant::now();
        self.rep.phase(Phase::Dump);
        let final_round = result.rounds.len() as u32 + 1;
        let sizes = self.criu_round(RoundKind::Final, final_round).map_err(|e| self.explain_send_error(e))?;
        result.tmpfs_made_anew = self.tmpfs_made_anew.clone();
        result.final_bytes = Some(sizes.pages);
        result.final_relayed_bytes = Some(sizes.relayed_pages);
        result.image_bytes += sizes.images;
        self.p.peer.flush().map_err(|e| self.explain_send_error(e))?;
        phases.dump_and_transfer_ms = phase_started.elapsed().as_millis() as u64;
        phases.criu_dump_ms = sizes.criu_ms;

        let phase_started = Instant::now();
        self.rep.phase(Phase::Restore);
        self.step(SourceEvent::ImagesSent)?;
        let frame = self.p.peer.read_with_timeout(self.opts.restore_timeout)?;
        let restored: Ready = frame.expect(MessageKind::Ready, "Ready")?.json()?;
        self.step(SourceEvent::Ready)?;
        // The receiver restores only after proving its rootfs equal to
        // the digest sent with the frozen pass.
        result.rootfs_verified = true;
        phases.restore_wait_ms = phase_started.elapsed().as_millis() as u64;
        phases.restore_ms = restored.restore_ms;
        result.frozen_phases = Some(phases);
        Ok(())
    }

    /// Runs CRIU in a thread while this one streams its pages (relayed
    /// from CRIU's page-server socket if `relay_pages`, else read from the
    /// page images as CRIU writes them); then sends the rest and ImagesDone.
    fn dump_and_stream(&mut self, mut dump: DumpOptions, relay_pages: bool) -> Result<images::RoundBytes, MigrationError> {
        let images = dump.images_dir.clone();
        let log = self.work_dir.join(&dump.log_file);
        let pre_dump = dump.pre_dump;
        let what = if pre_dump { "pre-dump" } else { "dump" };
        let started = Instant::now();
        let (mut session, relay_socket) = if relay_pages {
            let (ours, theirs) = criu_bindings::page_server_socketpair(RELAY_SOCKET_BUFFER)
                .map_err(|e| MigrationError::Other(format!("creating CRIU's page-server socket: {e}")))?;
            dump.page_server_fd = Some(PAGE_SERVER_FD);
            (CriuSession::start_with_fds(&self.opts.criu_binary, vec![(PAGE_SERVER_FD, theirs)])?, Some(std::os::unix::net::UnixStream::from(ours)))
        } else {
            (CriuSession::start(&self.opts.criu_binary)?, None)
        };
        if let (Some(g), Some(pid)) = (self.guard.as_mut(), session.pid()) {
            g.watch_criu(pid);
        }
        // CRIU's own time is taken in its thread: this one may be busy
        // sending a backlog when CRIU returns.
        let worker = std::thread::spawn(move || -> Result<u64, criu_bindings::CriuError> {
            session.dump(&dump, &mut |_| NotifyAction::Continue)?;
            if dump.pre_dump {
                session.finish_after_pre_dump()?;
            } else {
                session.finish()?;
            }
            Ok(started.elapsed().as_millis() as u64)
        });
        let mut streamer = images::ImageStreamer::new(&images);
        let streamed = match &relay_socket {
            Some(socket) => {
                let relayed = self.relay_pages(&mut streamer, socket);
                if relayed.is_err() {
                    // CRIU may be blocked on the socket: make its next
                    // write fail, so that it ends.
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
                relayed
            }
            None => self.stream_image_files(&mut streamer, &worker).map_err(images::RelayError::Send),
        };
        let dumped = worker.join().map_err(|_| MigrationError::Other("the CRIU thread panicked".into()))?;
        // A failure to send is the cause when it came first (CRIU then
        // failed on the socket shut under it); one reading from CRIU is
        // CRIU's failure's effect.
        let relay_detail = match &streamed {
            Err(images::RelayError::Source(e)) => format!("; its page-server socket: {e}"),
            _ => String::new(),
        };
        let streamed = match streamed {
            Err(images::RelayError::Send(e)) => return Err(e),
            Err(images::RelayError::Source(e)) if dumped.is_ok() => {
                return Err(MigrationError::Io { context: "reading pages from CRIU's page-server socket".into(), source: e })
            }
            other => other,
        };
        let dump_ms = match dumped {
            Ok(ms) => ms,
            Err(e) => {
                let detail = container_runtime::runc::criu_log_errors(&log).map(|d| format!(": {d}")).unwrap_or_default();
                return Err(MigrationError::Other(format!("CRIU {what} failed ({e}{relay_detail}){detail}")));
            }
        };
        let pagemaps = streamed.expect("errors handled above");
        if !pre_dump {
            self.rep.phase(Phase::Transfer);
            failpoint!("sender-after-dump")?;
        }
        for (name, bytes) in pagemaps {
            streamer.send_relayed_file(&mut self.p.peer.writer, &mut self.compressor, &name, &bytes)?;
        }
        streamer.finish(&mut self.p.peer.writer, &mut self.compressor, dump_ms)
    }

    /// Sends what the page images gain until the CRIU thread ends.
    fn stream_image_files(
        &mut self,
        streamer: &mut images::ImageStreamer,
        worker: &std::thread::JoinHandle<Result<u64, criu_bindings::CriuError>>,
    ) -> Result<Vec<(String, Vec<u8>)>, MigrationError> {
        let mut streamed = 0u64;
        let transfer_start = Instant::now();
        while !worker.is_finished() {
            match streamer.pump(&mut self.p.peer.writer, &mut self.compressor)? {
                0 => std::thread::sleep(Duration::from_millis(2)),
                n => {
                    streamed += n;
                    self.rep.progress(Phase::Dump, streamed, transfer_start);
                }
            }
        }
        Ok(Vec::new())
    }

    /// Serves CRIU's page-server requests until it closes: each run of
    /// pages goes on to the receiver as it arrives, as part of the pages
    /// image its pagemap names. Returns the pagemap images (made here,
    /// small) to send once CRIU is done.
    fn relay_pages(
        &mut self,
        streamer: &mut images::ImageStreamer,
        socket: &std::os::unix::net::UnixStream,
    ) -> Result<Vec<(String, Vec<u8>)>, images::RelayError> {
        use criu_bindings::page_server::{PageServerConn, PageServerRequest, RELAYED_PAGES_ID_BASE};
        use criu_bindings::pagemap::{PagemapImageBuilder, FLAG_PRESENT};
        let mut conn = PageServerConn::new(socket);
        let mut pagemaps: Vec<(String, PagemapImageBuilder)> = Vec::new();
        let mut pages_name = String::new();
        let mut streamed = 0u64;
        let transfer_start = Instant::now();
        // What CRIU sent wrong is CRIU's failure, reported with its log.
        let from_criu = |why: String| images::RelayError::Source(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
        loop {
            let request = conn.next_request().map_err(|e| match e {
                criu_bindings::page_server::PageServerError::Io(e) => images::RelayError::Source(e),
                other => from_criu(other.to_string()),
            })?;
            match request {
                PageServerRequest::Open { pagemap_name } => {
                    let pages_id = RELAYED_PAGES_ID_BASE + pagemaps.len() as u32;
                    pages_name = format!("pages-{pages_id}.img");
                    for name in [&pagemap_name, &pages_name] {
                        streamer.add_relayed(name).map_err(|e| from_criu(e.to_string()))?;
                    }
                    pagemaps.push((pagemap_name, PagemapImageBuilder::new(pages_id)));
                }
                PageServerRequest::Add { vaddr, nr_pages, flags } => {
                    let (name, pagemap) = pagemaps.last_mut().expect("the connection refuses runs before an Open");
                    pagemap.push(vaddr, nr_pages, flags).map_err(|e| from_criu(format!("{name}: {e}")))?;
                    if flags & FLAG_PRESENT != 0 {
                        let len = nr_pages * 4096;
                        streamer.relay(&mut self.p.peer.writer, &mut self.compressor, &pages_name, conn.data(), len)?;
                        if streamed == 0 {
                            failpoint!("sender-during-relay").map_err(images::RelayError::Send)?;
                        }
                        streamed += len;
                        self.rep.progress(Phase::Dump, streamed, transfer_start);
                    }
                }
                PageServerRequest::Close => break,
            }
        }
        Ok(pagemaps.into_iter().map(|(name, pagemap)| (name, pagemap.into_bytes())).collect())
    }

    /// A write error usually means the receiver hung up; use its reason.
    fn explain_send_error(&mut self, e: MigrationError) -> MigrationError {
        let broken = match &e {
            MigrationError::Protocol(migration_protocol::ProtocolError::Io(_)) | MigrationError::Io { .. } => true,
            MigrationError::Other(m) => m.contains("Broken pipe") || m.contains("reset"),
            _ => false,
        };
        if broken {
            if let Some(reason) = self.p.peer.reason_for_hangup() {
                return MigrationError::Remote(reason);
            }
        }
        e
    }

    /// Tells the receiver to give up, if it still listens.
    fn tell_receiver_abort(&mut self, error: &MigrationError) {
        let _ = self.p.peer.writer.write_json(MessageKind::Abort, &migration_protocol::Abort { reason: error.to_string() });
        let _ = self.p.peer.flush();
        self.p.peer.control.shutdown_write();
    }

    /// Tells the receiver to drop its copy, thaws the source and checks it.
    fn rollback(&mut self, error: MigrationError) -> Failure {
        self.rep.phase(Phase::Rollback);
        self.tell_receiver_abort(&error);
        let _ = self.step(SourceEvent::Failed);
        let thawed = settle::thaw_source(self.plan(), &self.opts.container);
        if let Some(net) = self.p.network.as_mut() {
            net.locked = thawed.is_err();
        }
        let _ = self.step(if thawed.is_ok() { SourceEvent::Thawed } else { SourceEvent::ThawFailed });
        match thawed {
            Ok(()) => Failure { error, outcome: Outcome::SourceResumed },
            Err(resume) => Failure {
                error: MigrationError::Other(format!(
                    "{error}; AND THE SOURCE COULD NOT BE RESUMED: {resume}. Check `runc --root {} state {}` and thaw {} by hand",
                    self.opts.runtime_root.display(),
                    self.opts.container,
                    self.p.plan.freezer.path.display()
                )),
                outcome: Outcome::SourceNotResumed,
            },
        }
    }

    /// Kills and deletes the (frozen) source after the destination committed.
    fn destroy_source(&mut self) {
        for w in settle::remove_source(self.plan(), &self.opts.container) {
            self.rep.warn(format!("migrated, but {w}"));
        }
        self.p.peer.control.shutdown();
    }

    /// Drops all traffic of the container's namespace, which ctmigrate
    /// moves (it is always external to CRIU's dump).
    fn lock_network(&mut self) -> Result<(), MigrationError> {
        let Some(net) = self.p.network.as_mut() else { return Ok(()) };
        container_network::lock::lock(&net.netns).map_err(|e| MigrationError::Other(format!("cannot lock the container's network: {e}")))?;
        net.locked = true;
        if let Some(g) = self.guard.as_mut() {
            g.watch_netns_lock(&net.netns.path());
        }
        Ok(())
    }

    fn unlock_network(&mut self) {
        let Some(net) = self.p.network.as_mut() else { return };
        match container_network::lock::unlock(&net.netns) {
            Ok(()) => net.locked = false,
            Err(e) => self.rep.warn(format!("cannot unlock the container's network {}: {e}", net.netns.path().display())),
        }
    }
}

/// The states a settling process needs to find in the journal. Inside
/// the frozen window only `commit-sent` is written (each write is an
/// fsync): before it, whatever the journal says, the answer is to thaw.
fn journalled(state: SourceState) -> bool {
    use SourceState::*;
    matches!(state, Syncing | CommitSent | InDoubt | LeftInDoubt | Committed | Migrated | Untouched | Resumed | NotResumed)
}

/// Directory of a round's images, on both sides.
pub fn round_dir(kind: RoundKind, round: u32) -> String {
    match kind {
        RoundKind::PreDump => format!("round-{round}"),
        RoundKind::Final => "final".to_string(),
    }
}
