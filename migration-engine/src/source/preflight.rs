//! Preflight: everything before the first byte of the container moves.
//! Finds the container and reads its state, checks what the destination
//! cannot take, connects and authenticates, and has the manifest
//! accepted. A failure here touches nothing (exit 3).

use super::*;

pub(super) fn preflight(opts: &SendOptions, dest_id: &str, rep: &Reporter) -> Result<Prepared, MigrationError> {
    let found = inspect(opts, dest_id, rep)?;
    agree(opts, dest_id, found, rep)
}

/// What this host knows of the container before anything moves.
pub(super) struct Inspected {
    pub state: RuncState,
    pub plan: DumpPlan,
    /// Its OCI configuration, as the destination gets it.
    pub config: serde_json::Value,
    pub criu_version: String,
    pub mode: Mode,
    pub mode_reason: Option<String>,
    pub network: Option<SourceNetwork>,
    pub network_handling: Option<String>,
    pub memory_bytes: u64,
    pub hidden_mounts: std::collections::BTreeSet<PathBuf>,
}

/// Finds the container and reads its state: runc's, the cgroup's, CRIU's
/// version, the network, the mounts.
fn inspect(opts: &SendOptions, dest_id: &str, rep: &Reporter) -> Result<Inspected, MigrationError> {
    rep.phase(Phase::Preflight);
    validate_container_id(&opts.container)?;
    validate_container_id(dest_id)?;
    let runc = Runc::new(&opts.runc_binary, &opts.runtime_root);
    let state = runc.running(&opts.container)?;
    let internal: RuncInternalState = runc.internal_state(&opts.container)?;
    let mut plan = DumpPlan::for_container(&internal)?;
    let (network, network_handling) = match &opts.pod {
        // A shared network namespace is the pod's leader's to record, lock
        // and move; each member of a pod sharing only its IPC namespace
        // moves its own.
        Some(member) if member.wire.shares_network && !member.leader => (None, Some(format!("the pod's, moved with `{}`", member.wire.leader))),
        Some(_) => source_network(&mut plan, &internal, rep)?,
        None => {
            refuse_shared_namespaces(&opts.container, &plan)?;
            source_network(&mut plan, &internal, rep)?
        }
    };

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
    if opts.pod.is_some() && mode.lazy() {
        return Err(MigrationError::Preflight(format!(
            "`{}` is a member of a pod: post-copy does not move pods; use --mode stop-copy or precopy",
            opts.container
        )));
    }
    let hidden_mounts = rootfs::scan::hidden_mount_points(state.pid)?;
    if let Some(reason) = &mode_reason {
        rep.warn(reason.clone());
    }
    Ok(Inspected { state, plan, config, criu_version: criu_version.to_string(), mode, mode_reason, network, network_handling, memory_bytes, hidden_mounts })
}

/// Connects, authenticates and has the manifest accepted: the
/// destination has agreed to take the container.
pub(super) fn agree(opts: &SendOptions, dest_id: &str, found: Inspected, rep: &Reporter) -> Result<Prepared, MigrationError> {
    let Inspected { state, plan, config, criu_version, mode, mode_reason, network, network_handling, memory_bytes, hidden_mounts } = found;
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
        bwlimit: opts.bwlimit.clone(),
        ssh_options: &opts.ssh_options,
        remote_command: &opts.remote_command,
    };
    let (mut peer, ack) = connect_peer(&link, Some(rep), true)?;
    if mode.lazy() && ack.version < migration_protocol::PROTOCOL_VERSION_POSTCOPY {
        return Err(MigrationError::Preflight(format!(
            "the receiver ({}) speaks protocol version {}, which has no post-copy: upgrade it, or use --mode stop-copy",
            ack.software, ack.version
        )));
    }
    if let Some(needs) = opts.pod.as_ref().map(|m| m.wire.needs_version()).filter(|v| ack.version < *v) {
        return Err(MigrationError::Preflight(format!(
            "the receiver ({}) speaks protocol version {}, which cannot take this pod (containers sharing {}) as one unit (version {needs} can): upgrade it",
            ack.software,
            ack.version,
            if needs > migration_protocol::PROTOCOL_VERSION_PODS { "an IPC namespace" } else { "a network namespace" }
        )));
    }
    let uts = nix::sys::utsname::uname().map_err(|e| MigrationError::Other(e.to_string()))?;
    let migration_id = crate::journal::new_migration_id();
    let manifest = Manifest {
        migration_id: migration_id.clone(),
        container_id: opts.container.clone(),
        dest_id: dest_id.to_string(),
        oci_config: config,
        criu_version,
        kernel: uts.release().to_string_lossy().into_owned(),
        arch: std::env::consts::ARCH.to_string(),
        cgroup_version: plan.freezer.version.as_u8(),
        mode: mode.name().into(),
        max_rounds: if mode.precopy_rounds() { opts.max_iterations } else { 0 },
        tcp_established: opts.tcp_established,
        network: network.as_ref().map(|n| n.record.clone().into()),
        memory_bytes,
        empty_tmpfs: plan.empty_tmpfs.iter().cloned().map(Into::into).collect(),
        pod: opts.pod.as_ref().map(|m| m.wire.clone()),
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
    pub bwlimit: Option<std::sync::Arc<crate::transport::Rate>>,
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
    let mut interrupt_cut = None;
    let mut peer = match link.to {
        crate::transport::Destination::Tcp { host, .. } => {
            let stream = connect(link.to, link.io_timeout)?;
            if register_interrupt {
                interrupt_cut = Some(interrupt::register_connection(&stream));
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
                writer: FrameWriter::new(BufWriter::with_capacity(256 * 1024, crate::transport::Throttle::new(conn, link.bwlimit.clone()))),
                ssh: None,
                interrupt_cut: None,
                version: 0,
            }
        }
        ssh_dest @ crate::transport::Destination::Ssh { .. } => {
            // ssh's stderr, for the reason it gives when it fails.
            let stderr = tempfile::NamedTempFile::new().map_err(MigrationError::io("creating ssh's stderr file"))?;
            let err_file = stderr.reopen().map_err(MigrationError::io("opening ssh's stderr file"))?;
            let mut child = crate::transport::spawn_ssh(ssh_dest, link.ssh_options, link.remote_command, err_file)?;
            let pid = child.id() as i32;
            if register_interrupt {
                interrupt_cut = Some(interrupt::register_cut(move || {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
                }));
            }
            let read: std::fs::File = std::os::fd::OwnedFd::from(child.stdout.take().expect("piped")).into();
            let write: std::fs::File = std::os::fd::OwnedFd::from(child.stdin.take().expect("piped")).into();
            let conn = Conn::pipes(read, write);
            Peer {
                identity: ssh_dest.to_string(),
                reader: FrameReader::new(conn.handle()?),
                control: conn.handle()?,
                writer: FrameWriter::new(BufWriter::with_capacity(256 * 1024, crate::transport::Throttle::new(conn, link.bwlimit.clone()))),
                ssh: Some((child, stderr)),
                interrupt_cut: None,
                version: 0,
            }
        }
    };
    peer.interrupt_cut = interrupt_cut;
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
    peer.version = ack.version;
    Ok((peer, ack))
}

/// A container alone may not take a namespace others use: moved, its
/// network namespace would be rebuilt on the destination without them (and
/// removed here), and an IPC namespace would be split in two copies.
/// Those containers move together (`send A B`, `evacuate`), as a pod.
pub(super) fn refuse_shared_namespaces(container: &str, plan: &DumpPlan) -> Result<(), MigrationError> {
    let inside = crate::pods::in_cgroups_of(&[plan.pid]);
    for (kind, what) in [("net", "network"), ("ipc", "IPC")] {
        let sharers = crate::pods::namespace_sharers(plan.pid, kind, &inside);
        if let Some(&(pid, ref comm)) = sharers.first() {
            return Err(MigrationError::Preflight(format!(
                "container `{container}` shares its {what} namespace with {} process(es) outside it (pid {pid}, {comm}): moved alone it would take the namespace from them; move the containers that share it in one command (`ctmigrate send {container} OTHER...`)",
                sharers.len()
            )));
        }
    }
    Ok(())
}

/// CRIU reads every task's resource limits with prlimit(), which for a
/// task that is not all root needs CAP_SYS_RESOURCE. Without it, only a
/// CRIU with ctmigrate's rlimit patch can dump such a task: refuse now,
/// before anything is frozen, naming the task. The binary's sha256 is
/// taken only when it matters (no capability, a non-root task).
pub(super) fn check_rlimits_readable(opts: &SendOptions, plan: &DumpPlan) -> Result<(), MigrationError> {
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
pub(super) fn container_memory_bytes(plan: &DumpPlan) -> u64 {
    plan.freezer
        .pids()
        .iter()
        .filter_map(|pid| container_runtime::procinfo::status(*pid)?.vmrss)
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
pub(super) fn source_network(
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
pub(super) fn not_carried_of_loopback_namespace(netns: &container_network::Netns) -> Option<String> {
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
/// stop-copy (with the reason) where it does not; with
/// `--allow-postcopy` it becomes hybrid or post-copy where CRIU can
/// restore lazily. `precopy` and `hybrid` on a kernel without soft-dirty,
/// and `postcopy` without userfaultfd, are refused before anything is
/// touched.
pub(super) fn resolve_mode(opts: &SendOptions) -> Result<(Mode, Option<String>), MigrationError> {
    if opts.mode == ModeRequest::StopCopy {
        return Ok((Mode::StopCopy, None));
    }
    if !(1..=MAX_ITERATIONS).contains(&opts.max_iterations) {
        return Err(MigrationError::Usage(format!(
            "--max-iterations must be from 1 to {MAX_ITERATIONS} (got {})",
            opts.max_iterations
        )));
    }
    let lease_ms = opts.postcopy_lease.as_millis() as u64;
    if !(migration_protocol::LEASE_MIN_MS..=migration_protocol::LEASE_MAX_MS).contains(&lease_ms) {
        return Err(MigrationError::Usage(format!(
            "--postcopy-lease must be from {} ms to {} s (got {lease_ms} ms)",
            migration_protocol::LEASE_MIN_MS,
            migration_protocol::LEASE_MAX_MS / 1000
        )));
    }
    let lazy_wanted = matches!(opts.mode, ModeRequest::Postcopy | ModeRequest::Hybrid) || (opts.mode == ModeRequest::Auto && opts.allow_postcopy);
    if lazy_wanted && !matches!(opts.to, Destination::Tcp { .. }) {
        return Err(MigrationError::Usage("post-copy and hybrid need a tcp:// destination (the page requests are relayed on its connection)".into()));
    }
    let features = criu_bindings::feature_check(&opts.criu_binary)?;
    let (soft_dirty, uffd) = (features.mem_track, features.lazy_pages);
    let no_soft_dirty = "this kernel has no soft-dirty memory tracking (CONFIG_MEM_SOFT_DIRTY), so pre-copy is impossible";
    match opts.mode {
        ModeRequest::Precopy | ModeRequest::Hybrid if !soft_dirty => Err(MigrationError::Preflight(format!(
            "{} needs soft-dirty memory tracking, which this kernel lacks: boot a kernel built with \
             CONFIG_MEM_SOFT_DIRTY=y, or use --mode {}",
            if opts.mode == ModeRequest::Hybrid { "hybrid" } else { "pre-copy" },
            if opts.mode == ModeRequest::Hybrid { "postcopy" } else { "stop-copy" }
        ))),
        ModeRequest::Postcopy | ModeRequest::Hybrid if !uffd => Err(MigrationError::Preflight(
            "post-copy needs userfaultfd (CRIU's lazy pages), which `criu check` says this kernel lacks: use --mode stop-copy".into(),
        )),
        ModeRequest::Precopy => Ok((Mode::Precopy, None)),
        ModeRequest::Postcopy => Ok((Mode::Postcopy, None)),
        ModeRequest::Hybrid => Ok((Mode::Hybrid, None)),
        ModeRequest::StopCopy => Ok((Mode::StopCopy, None)),
        ModeRequest::Auto => match (soft_dirty, opts.allow_postcopy && uffd) {
            (true, true) => Ok((Mode::Hybrid, Some("hybrid: soft-dirty tracking and userfaultfd are both here, and --allow-postcopy was given".into()))),
            (true, false) => Ok((Mode::Precopy, None)),
            (false, true) => Ok((Mode::Postcopy, Some(format!("postcopy: --allow-postcopy was given and {no_soft_dirty}")))),
            (false, false) => Ok((Mode::StopCopy, Some(format!("stop-copy: {no_soft_dirty}")))),
        },
    }
}
