//! The source side of a migration, one file a phase:
//!
//! | phase | file | a failure there |
//! |---|---|---|
//! | preflight: find the container, connect, handshake, manifest accepted | [`preflight`] | touches nothing (exit 3) |
//! | rootfs sync and pre-copy rounds, container running | this file, [`precopy`] | touches nothing (exit 3) |
//! | freeze, rootfs delta, CRIU's dump streamed, wait for Ready | [`dump`] | thaws the source (exit 4) |
//! | Commit → CommitAck | [`commit`] | the destination's word decides; in doubt, frozen (exit 6) |
//! | thaw or removal | [`rollback`] | — |
//!
//! [`Migration::run_inner`] is the sequence; the state machine in
//! `migration_protocol::state` decides what each failure does
//! ([`Migration::fail`]).

use std::io::BufWriter;

use crate::tls::{Conn, Security};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use container_runtime::{validate_container_id, DumpPlan, EmptyTmpfs, FreezerState, Runc, RuncInternalState, RuncState};
use criu_bindings::{DumpOptions, ExternalMount};
use migration_protocol::{
    RootfsPhase, CompressionMode, Compressor, ErrorMessage, FrameReader, FrameWriter, Hello, HelloAck, Manifest, ManifestAccepted,
    MessageKind, Ready, RoundBegin, RoundDone, RoundKind, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};

use crate::error::{Failure, Outcome};
use crate::journal::{Entry, Journal, Role, Side, SourcePlan};
use migration_protocol::state::SourceEvent;
use migration_protocol::{SourceFate, SourceMachine, SourceState};
use crate::events::{Event, Phase, ResultEvent};
use crate::transport::{connect, Destination};
use crate::guard::FreezeGuard;
use crate::precopy::{Convergence, ModeRequest, RoundReport};
use crate::{images, interrupt, rootfs, MigrationError, Reporter};

mod commit;
mod dump;
mod host;
pub mod pod;
mod precopy;
mod postcopy;
mod preflight;
mod rollback;
#[cfg(test)]
mod tests;

pub(crate) use host::{CriuRun, RealSourceHost, SourceHost};
pub(crate) use postcopy::lease_wait;
pub use preflight::MAX_ITERATIONS;
pub(crate) use preflight::{connect_peer, PeerLink};
use preflight::preflight;

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
    /// Most bytes per second on the wire (`--bwlimit`), shared with every
    /// migration that holds the same [`Rate`](crate::transport::Rate).
    pub bwlimit: Option<std::sync::Arc<crate::transport::Rate>>,
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
    /// `--mode auto` may choose post-copy or hybrid (`--allow-postcopy`).
    pub allow_postcopy: bool,
    /// How long the destination's copy may run without hearing from the
    /// source during post-copy (`--postcopy-lease`).
    pub postcopy_lease: Duration,
    /// This container is one member of a pod moving together (see
    /// [`pod`]); None for a container moving alone.
    pub pod: Option<pod::PodMember>,
    /// Several migrations at once (`evacuate`): how many may be frozen at
    /// the same time (see [`crate::evacuate::FreezeSlots`]).
    pub freeze_slots: Option<std::sync::Arc<crate::evacuate::FreezeSlots>>,
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
    /// The copy runs on the destination before its memory arrived.
    Postcopy,
    /// Pre-copy rounds, then post-copy of what is left.
    Hybrid,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::StopCopy => "stop-copy",
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }

    /// Whether pre-dump rounds run first.
    fn precopy_rounds(self) -> bool {
        matches!(self, Mode::Precopy | Mode::Hybrid)
    }

    /// Whether memory follows the restore.
    fn lazy(self) -> bool {
        matches!(self, Mode::Postcopy | Mode::Hybrid)
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
    /// While held, SIGINT or SIGTERM cuts this connection.
    interrupt_cut: Option<interrupt::Registration>,
    /// The protocol version agreed at the handshake.
    version: u32,
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

    /// Tells a receiver that waits for our next frame that we are still
    /// there (version 6 and later skip it; older ones would refuse it, and
    /// are told nothing: their --timeout then bounds the wait).
    pub(crate) fn keepalive(&mut self) -> Result<(), MigrationError> {
        if self.version < migration_protocol::PROTOCOL_VERSION_PODS {
            return Ok(());
        }
        self.writer.write_frame(MessageKind::Keepalive, b"")?;
        self.flush()
    }

    /// A keepalive for a wait's "still there?": false, with the error kept
    /// in `failed`, when the receiver cannot be told.
    fn still_there(&mut self, failed: &mut Option<MigrationError>) -> bool {
        match self.keepalive() {
            Ok(()) => true,
            Err(e) => {
                *failed = Some(e);
                false
            }
        }
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
    #[cfg(feature = "failpoints")]
    crate::failpoints::set_scope(&opts.container);
    // One migration of several: until its freeze slot, it yields the CPUs
    // to those frozen (see crate::priority).
    let background = opts.freeze_slots.is_some().then(crate::priority::Background::enter);
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
    // A pod's members other than its leader connect once the leader is
    // accepted (the destination builds the pod's namespace then).
    let outcome = outcome.and_then(|()| match &opts.pod {
        Some(member) if !member.leader => member
            .barrier
            .wait_for_leader(&opts.container, opts.io_timeout * 4)
            .map_err(|error| Failure { error, outcome: Outcome::NothingTouched }),
        _ => Ok(()),
    });
    let outcome = outcome.and_then(|()| match preflight(opts, &dest_id, rep) {
        Err(error) => Err(Failure { error, outcome: Outcome::NothingTouched }),
        Ok(prepared) => {
            if let Some(member) = opts.pod.as_ref().filter(|m| m.leader) {
                member.barrier.leader_admitted();
            }
            result.mode = prepared.mode.name().into();
            result.mode_reason = prepared.mode_reason.clone();
            result.network = prepared.network_handling.clone();
            peer = prepared.peer.identity.clone();
            result.migration_id = Some(prepared.migration_id.clone());
            let host = RealSourceHost { criu_binary: opts.criu_binary.clone(), guard_exe: opts.guard_exe.clone() };
            let mut migration = Migration::new(opts, prepared, rep, Box::new(host));
            migration.background = background;
            migration.run(&mut result)
        }
    });
    result.total_ms = started.elapsed().as_millis() as u64;
    if let (Some(member), Err(f)) = (&opts.pod, &outcome) {
        // Whatever failed (preflight included), the rest of the pod stops.
        member.barrier.fail(&opts.container, &f.error.to_string());
    }
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
    /// Everything done to the container and its host (see [`host`]).
    host: Box<dyn SourceHost + 'a>,
    /// Staging memory set aside before the freeze, given to CRIU's first dump.
    reserve: Option<crate::scratch::Reserve>,
    /// Mount points of the empty tmpfs left out of the final dump.
    tmpfs_made_anew: Vec<String>,
    /// The rootfs as sent so far, and what changed since.
    tree: rootfs::TreeSender,
    /// Post-copy: the lazy dump serving pages, and the lease.
    lazy: Option<postcopy::LazySource>,
    lease: postcopy::SourceLease,
    /// Held from before the freeze to the end (see [`SendOptions::freeze_slots`]).
    freeze_slot: Option<crate::evacuate::FreezeSlot>,
    /// This thread's lowered priority until the freeze (see [`crate::priority`]).
    background: Option<crate::priority::Background>,
}

impl<'a> Migration<'a> {
    fn new(opts: &'a SendOptions, mut p: Prepared, rep: &'a Reporter, host: Box<dyn SourceHost + 'a>) -> Self {
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
            postcopy_lease_ms: opts.postcopy_lease.as_millis() as u64,
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
            host,
            reserve: None,
            tmpfs_made_anew: Vec::new(),
            tree,
            lazy: None,
            lease: postcopy::SourceLease::new(opts.postcopy_lease),
            freeze_slot: None,
            background: None,
        }
    }

    /// Moves the machine on, and journals the states that matter to a
    /// process settling the migration after this one.
    ///
    /// `commit-sent` counts only once it is on disk: if it cannot be
    /// written the machine stays before the Commit, where a failure thaws
    /// (the Commit never goes out) rather than asks the destination. Other
    /// states are journalled as well as can be; the machine moves anyway.
    fn step(&mut self, event: SourceEvent) -> Result<(), MigrationError> {
        let before = self.machine.clone();
        let state = self.machine.on(event).map_err(|e| MigrationError::Other(format!("internal: {e}")))?;
        if journalled(state) {
            self.entry.set_source_state(state);
            if let Err(e) = self.journal.write(&self.entry) {
                if state == SourceState::CommitSent {
                    self.entry.set_source_state(before.state());
                    self.machine = before;
                }
                return Err(MigrationError::Other(e.to_string()));
            }
        }
        Ok(())
    }

    fn run(mut self, result: &mut ResultEvent) -> Result<(), Failure> {
        let mut outcome = self.run_inner(result);
        if let Some(guard) = self.guard.take() {
            guard.resolved();
        }
        self.p.peer.interrupt_cut = None;
        if let Err(f) = &mut outcome {
            if interrupt::interrupted() {
                f.error = MigrationError::Other(format!("interrupted by a signal ({})", f.error));
            }
        }
        result.fallback_after_run_ms = self.lease.fallback_after_run.map(|d| d.as_millis() as u64);
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

    /// A pod member waits for the others at `stage` (at once Ok for a
    /// container moving alone), telling its receiver every second that it
    /// is still there.
    fn pod_wait(&mut self, stage: pod::Stage) -> Result<(), MigrationError> {
        let Some(member) = self.opts.pod.clone() else { return Ok(()) };
        // Each member may still be syncing a large rootfs or dumping a
        // large memory: the longest of the waits a migration allows.
        let timeout = self.opts.restore_timeout.max(self.opts.io_timeout) + self.opts.io_timeout;
        let mut keepalive_failed = None;
        let peer = &mut self.p.peer;
        let waited = member.barrier.wait(stage, &self.opts.container, timeout, &mut || peer.still_there(&mut keepalive_failed));
        match keepalive_failed {
            Some(e) => {
                member.barrier.fail(&self.opts.container, &e.to_string());
                Err(e)
            }
            None => waited,
        }
    }

    /// Several migrations at once: waits, the container still running,
    /// until it may freeze (the slot is held until the migration ends).
    fn take_freeze_slot(&mut self) -> Result<(), MigrationError> {
        // A pod's members freeze together, as one unit of --parallel.
        let Some(slots) = self.opts.freeze_slots.clone().filter(|_| self.opts.pod.is_none()) else { return Ok(()) };
        let peer = &mut self.p.peer;
        let mut keepalive_failed = None;
        let slot = slots.acquire(&mut || peer.still_there(&mut keepalive_failed));
        match (slot, keepalive_failed) {
            (Some(slot), _) => {
                self.freeze_slot = Some(slot);
                // The frozen window (and CRIU, started from this thread)
                // runs at full priority.
                if let Some(bg) = self.background.as_mut() {
                    bg.foreground();
                }
                Ok(())
            }
            (None, Some(e)) => Err(e),
            (None, None) => Err(MigrationError::Other("the freeze slots were dropped".into())),
        }
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
        let rootfs_bytes = Some(self.tree.estimated_bytes());
        let initial = self.tree.initial_pass(&mut self.p.peer.writer, &mut self.compressor, &mut |n| {
            sent += n;
            rep.progress_of(Phase::RootfsSync, sent, rootfs_bytes, since);
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
        if self.p.mode.precopy_rounds() {
            if let Err(e) = self.precopy(result) {
                let e = self.explain_send_error(e);
                return Err(self.fail(e));
            }
        }
        // With others migrating at once, only a few freeze at a time: their
        // frozen windows would share the CPUs and each last longer.
        if let Err(e) = self.take_freeze_slot() {
            return Err(self.fail(e));
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
        match self.host.spawn_guard(&self.p.plan.freezer, &self.work_dir, &self.journal.path_of(Role::Source, &self.entry.id)) {
            Ok(None) => {}
            Ok(Some(g)) => {
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
        // A pod freezes together, once its leader locked the namespace.
        if let Err(e) = self.pod_wait(pod::Stage::BeforeFreeze) {
            self.unlock_network();
            return Err(self.fail(e));
        }
        if let Err(e) = self.host.freeze(&self.p.plan.freezer, self.opts.freeze_timeout) {
            self.unlock_network();
            return Err(self.fail(e));
        }
        let frozen_at = Instant::now();
        if let Err(e) = self.step(SourceEvent::Froze) {
            return Err(self.fail(e));
        }
        if let Err(e) = self.pod_wait(pod::Stage::Frozen) {
            return Err(self.fail(e));
        }
        if let Err(e) = self.frozen_phase(result) {
            return Err(self.fail(e));
        }
        // A pod commits only once every member's copy is Ready.
        if let Err(e) = self.pod_wait(pod::Stage::Ready) {
            return Err(self.fail(e));
        }

        let acknowledged = self.commit(result);
        // The frozen window is over: another migration may freeze.
        self.freeze_slot = None;
        let acknowledged = acknowledged?;
        // Post-copy's frozen time ends when the destination's copy runs.
        result.frozen_ms = Some(self.lease.granted_after(frozen_at).unwrap_or_else(|| frozen_at.elapsed()).as_millis() as u64);
        if !acknowledged {
            // Settled after a lost acknowledgement: the destination runs
            // it and the source is already removed.
            return Ok(());
        }

        // The destination runs the container: remove the source.
        self.rep.phase(Phase::Cleanup);
        self.destroy_source();
        if let Err(e) = self.step(SourceEvent::SourceRemoved) {
            self.rep.warn(format!("migrated, but {e}"));
        }
        Ok(())
    }

}

/// A sender's journal entry's plan (taken from the entry alone, so that it
/// can be borrowed beside the migration's host).
fn source_plan(entry: &Entry) -> &SourcePlan {
    match &entry.side {
        Side::Source { plan, .. } => plan,
        Side::Destination { .. } => unreachable!("a sender's entry is a source entry"),
    }
}

/// The states a settling process needs to find in the journal. Inside
/// the frozen window only `commit-sent` is written (each write is an
/// fsync): before it, whatever the journal says, the answer is to thaw.
fn journalled(state: SourceState) -> bool {
    use SourceState::*;
    matches!(state, Syncing | PostcopyRunning | CommitSent | InDoubt | LeftInDoubt | Committed | Migrated | Untouched | Resumed | NotResumed)
}

/// Directory of a round's images, on both sides.
pub fn round_dir(kind: RoundKind, round: u32) -> String {
    match kind {
        RoundKind::PreDump => format!("round-{round}"),
        RoundKind::Final => "final".to_string(),
    }
}
